"""What a bank costs, measured on this machine, for sizing a cluster build (docs/CLUSTER.md). Prints JSON.

  parts   a real build (`build_bank`) of a generated corpus with the named encoder (untrained, seeded: stored
          bytes depend on the dims, not on the weights): bytes of Parquet parts (and per column), commit
          markers, rejects and manifests, divided by the segments built; plus the build's images/s and segments
          per image (CPU-measured).
  decode  the build's decode stage alone (`workers.decode_shard`: tar read, image + mask decode, segments,
          resize, soft masks) in this one process, over the same shards: images/s of one core, which sizes the
          decode CPUs a GPU needs.
  index   `build_index` on a synthetic bank (bench/synthetic_bank.py) of --index-vectors vectors with the
          encoder's visual dim and the factory refbank would choose for --target-segments, so the trained object
          is the one the target would get: bytes of the list objects per vector, and the fixed objects.
Extrapolation is linear in segments for parts and list objects; the trained object and directory are fixed
for a given factory; the label table grows with labels, not segments.

    python bench/cluster_cost.py --encoder clip-vit-b16 --shards 4 --samples-per-shard 32 --index-vectors 200000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import bench_common  # noqa: E402 - first: it takes this folder off the path (bench/query.py shadows `query`)

bench_common.leave_bench_folder()
_bank = bench_common.sibling("synthetic_bank")


def folder_bytes(root: str) -> dict[str, int]:
    """Bytes under `root` by top-level folder (parts, rejects, versions, index, ...) and file kind."""
    sizes: dict[str, int] = {}
    for folder, _, files in os.walk(root):
        top = os.path.relpath(folder, root).split(os.sep)[0]
        for name in files:
            key = f"{top}/*{os.path.splitext(name)[1]}" if top != "." else name
            sizes[key] = sizes.get(key, 0) + os.path.getsize(os.path.join(folder, name))
    return dict(sorted(sizes.items()))


def column_bytes(folder: str) -> dict[str, int]:
    """Compressed bytes per column, summed over every Parquet file in `folder` (from the footers)."""
    import pyarrow.parquet as pq

    sizes: dict[str, int] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".parquet"):
            meta = pq.ParquetFile(os.path.join(folder, name)).metadata
            for g in range(meta.num_row_groups):
                for c in range(meta.num_columns):
                    col = meta.row_group(g).column(c)
                    top = col.path_in_schema.split(".")[0]
                    sizes[top] = sizes.get(top, 0) + col.total_compressed_size
    return sizes


def measure_parts(args: argparse.Namespace, work: str) -> dict:
    """A real build of a generated corpus: stored bytes per segment and the build's rates."""
    from bank_builder.config import BuildConfig, EncoderConfig, PipelineConfig
    from bank_builder.pipeline import build_bank
    from bank_builder.ray_runtime import init_ray
    from bank_builder.synthetic import CorpusConfig, make_corpus

    make_corpus(f"{work}/corpus", CorpusConfig(shards=args.shards, samples_per_shard=args.samples_per_shard,
                                              image_size=args.image_size, seed=0))
    config = BuildConfig(source=f"{work}/corpus/train-*.tar", bank=f"{work}/bank",
                         encoder=EncoderConfig(name=args.encoder, weights="untrained"),
                         pipeline=PipelineConfig(batch_size=args.batch_size))
    init_ray(num_cpus=args.num_cpus)
    report = build_bank(config, on_progress=lambda p: None)
    if not report.ok:
        raise SystemExit(f"build failed: {report.failed}")
    decode = measure_decode(config)
    sizes = folder_bytes(f"{work}/bank")
    total = sum(sizes.values())
    return {"images": report.samples, "segments": report.segments, "rejects": report.rejects,
            "segments_per_image": round(report.segments / report.samples, 3),
            "visual_dim": report.encoder["visual_dim"], "text_dim": report.encoder["text_dim"],
            "bytes": sizes, "bytes_total": total, "bytes_per_segment": round(total / report.segments, 1),
            "parquet_bytes_per_segment": round(sizes.get("parts/*.parquet", 0) / report.segments, 1),
            "column_bytes_per_segment": {k: round(v / report.segments, 1)
                                         for k, v in column_bytes(f"{work}/bank/parts").items()},
            "build_seconds": round(report.seconds, 2), "build_images_per_s": round(report.images_per_s, 2),
            "build_startup_s": round(report.startup_s, 2), "cpus": args.num_cpus, "decode": decode}


def measure_decode(config) -> dict:
    """Images/s of the build's decode stage on one core: every shard of `config.source`, in this process."""
    from bank_builder.encoders import resolve_spec
    from bank_builder.ingest import list_shards
    from bank_builder.workers import DecodedBatch, decode_shard

    spec, images = resolve_spec(config.encoder), 0
    start = time.process_time()  # CPU time of this process: one core's work, whatever else the machine runs
    for shard in list_shards(config.source):
        for out in decode_shard(shard, config, spec, 1):  # chunks of one batch, then the shard's tail
            images += sum(len(b.images) for b in out if isinstance(b, DecodedBatch)) if isinstance(out, list) else 0
    seconds = time.process_time() - start
    return {"images": images, "cpu_seconds": round(seconds, 2), "images_per_cpu_s": round(images / seconds, 1)}


def measure_index(args: argparse.Namespace, dim: int) -> dict:
    """build_index on a synthetic bank of the encoder's dim, with the factory the target size would get."""
    from bank_builder.index import IndexConfig, build_index, choose_params

    target = choose_params(args.target_segments, dim, IndexConfig())
    bank, _ = _bank.ensure_bank(args.out, args.index_vectors, dim, args.index_parts, clusters=1000, spread=1.25)
    start = time.perf_counter()
    # retrain: the synthetic bank is kept between runs, and an index that holds every part is "up to date"
    report = build_index(bank, IndexConfig(factory=target.factory), retrain=True)
    seconds = time.perf_counter() - start
    b = report.bytes
    return {"vectors": report.vectors, "dim": dim, "factory": report.factory, "nlist": report.nlist,
            "code_size": report.code_size, "refine_factor": report.refine_factor, "bytes": b,
            "list_bytes_per_vector": round(b["lists"] / report.vectors, 1),
            "fixed_bytes": b["trained"] + b["directory"], "seconds": round(seconds, 1),
            "timings_s": report.timings_s, "train_gpu": report.train_gpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", default="clip-vit-b16")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--samples-per-shard", type=int, default=32)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--index-vectors", type=int, default=200_000)
    p.add_argument("--index-parts", type=int, default=20)
    p.add_argument("--target-segments", type=int, default=1_000_000)
    p.add_argument("--out", default="bench-out/cluster-cost", help="where the synthetic index bank is kept (reused)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="refbank-cost-") as work:
        parts = measure_parts(args, work)
    index = measure_index(args, parts["visual_dim"])
    n = args.target_segments
    per_segment = parts["bytes_per_segment"] + index["list_bytes_per_vector"]
    print(json.dumps({
        "parts": parts, "index": index,
        "extrapolated": {  # linear in segments; the fixed index objects once
            "segments": n, "parts_gb": round(parts["bytes_per_segment"] * n / 1e9, 3),
            "index_gb": round((index["list_bytes_per_vector"] * n + index["fixed_bytes"]) / 1e9, 3),
            "bank_gb": round((per_segment * n + index["fixed_bytes"]) / 1e9, 3),
        },
    }, indent=1))


if __name__ == "__main__":
    main()
