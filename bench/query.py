"""Query-side costs, one run: lazy sliced kNN vs one monolithic faiss index, cold-start bytes, segmentation latency.

    python bench/query.py --vectors 500000 --dim 64
    python bench/query.py --quick

Prints one JSON document with three sections, each a ratio taken inside this run (so load from other work on a
shared machine hits both sides alike: the timed variants alternate, and the fastest of --repeat runs counts):

knn         QPS of `query.search.BankSearcher` (whole-index mode: a `SliceCache` budget above the index; measured
            warm: every slice the queries touch is installed) ÷ QPS of one in-memory faiss index
            built from the same trained index (IndexIDMap(IndexRefineFlat(trained IVF)) with every bank vector
            added in part order: same quantizer, same codes, same list order), at the same nprobe, k and refine
            factor; for batch sizes 1 and 64 (--batch-sizes). Also the fraction of result ids the two agree on.
            Target: ratio ≥ 0.90. The bank is synthetic (bench/index_build.py's clustered Parquet parts, written
            once per shape under --out and reused, as is its index when the config matches); queries are bank
            vectors held out of the training sample plus Gaussian noise (--noise), L2-normalised.
cold_start  From an empty cache (no disk tier), batch-1 queries one after another: slice bytes fetched ÷ all slice
            bytes after 1, 10, 100 and all --queries queries (the trained index, fetched once at open, is reported
            apart). Also the same fractions simulated for other slice sizes (the library's plan_slices on the real
            list sizes and the real probed lists), since slice granularity is what decides them.
segmentation `Segmenter.vocabulary` latency (p50 / p99) on held-out images of a small real bank (generated corpus,
            `build_bank` with --encoder, untrained weights, then `build_index`, opened as the service opens it)
            ÷ the bare `encoder.encode_dense` forward of the same single image, p50 ÷ p50 and p99 ÷ p99. Target: both
            ≤ 1.25. The rest of the call is timed piece by piece on the same images (superpixels, resize + soft
            masks, forward, pooling, scoring + result assembly) so the ratio is explained.
Timings use one faiss thread and one torch thread by default (--threads, --torch-threads; see their help): both
sides of each ratio run on the same thread count, and the overheads measured here are single-threaded anyway.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import faiss
import numpy as np
import ray
import torch

# This file is bench/query.py: drop its folder from the path, or it would shadow the `query` package. The synthetic
# bank comes from bench/index_build.py (same parts, same generator), loaded by path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
_spec = importlib.util.spec_from_file_location("refbank_bench_index_build", os.path.join(_HERE, "index_build.py"))
_index_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_index_build)
ensure_bank = _index_build.ensure_bank

from bank_builder import manifest  # noqa: E402
from bank_builder.config import BuildConfig, EncoderConfig, IngestConfig, PipelineConfig, config_to_dict  # noqa: E402
from bank_builder.embed import pool_segments, prepare_image  # noqa: E402
from bank_builder.encoders import load_encoder  # noqa: E402
from bank_builder.index import IndexConfig, build_index, choose_params  # noqa: E402
from bank_builder.index import layout  # noqa: E402
from bank_builder.index.add import record_dtype  # noqa: E402
from bank_builder.index.slices import plan_slices  # noqa: E402
from bank_builder.index.source import VISUAL, iter_row_groups, matrix, read_rows  # noqa: E402
from bank_builder.index.train import deserialize, plan_sample  # noqa: E402
from bank_builder.ingest import iter_samples  # noqa: E402
from bank_builder.pipeline import build_bank  # noqa: E402
from bank_builder.ray_runtime import init_ray  # noqa: E402
from bank_builder.records import Reject  # noqa: E402
from bank_builder.synthetic import CorpusConfig, class_names, make_corpus  # noqa: E402
from query.bank import open_bank  # noqa: E402
from query.regions import RegionConfig, Regions, region_masks  # noqa: E402
from query.search import BankSearcher  # noqa: E402
from query.segment import Segmenter  # noqa: E402
from query.serving import encoder_config, label_table  # noqa: E402
from query.slices import SliceCache  # noqa: E402

QUICK = {"vectors": 100_000, "parts": 10, "clusters": 200, "queries": 500, "repeat": 2, "min_seconds": 0.25,
         "seg_shards": 1, "seg_samples_per_shard": 8, "seg_heldout_shards": 1, "image_size": 128, "seg_rounds": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small configuration: {QUICK} (explicit flags still win)")
    p.add_argument("--only", choices=["knn", "segmentation"], help="run one part (knn includes cold_start)")
    p.add_argument("--out", default="bench-out/query", help="where the banks are kept between runs")
    p.add_argument("--threads", type=int, default=1,
                   help="faiss (OpenMP) threads for the kNN timings; 0 = faiss's default (all cores). 1 by default: on "
                        "a small shared machine, OpenMP threads that wait on a descheduled sibling make faiss timings "
                        "swing tenfold, so one thread measures the work rather than the scheduler")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for the segmentation timings; 0 = torch's default (all cores); 1 by default "
                        "for the same reason as --threads")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per variant, alternating; the fastest counts")
    p.add_argument("--min-seconds", type=float, default=0.5, help="kNN: each timed run repeats passes this long")
    g = p.add_argument_group("kNN (synthetic bank)")
    g.add_argument("--vectors", type=int, default=500_000)
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--parts", type=int, default=20)
    g.add_argument("--clusters", type=int, default=1000)
    g.add_argument("--spread", type=float, default=1.25)
    g.add_argument("--memory-target", type=int, default=IndexConfig.memory_target_bytes_per_vector,
                   help="bytes per vector, id included (refbank's automatic factory choice)")
    g.add_argument("--factory", default=None, help="faiss factory string instead of the automatic choice")
    g.add_argument("--refine-factor", type=int, default=IndexConfig.refine_factor, help="0 = no refine")
    g.add_argument("--slice-mb", type=float, default=IndexConfig.slice_bytes / 2**20, help="target slice size")
    g.add_argument("--nprobe", type=int, default=None, help="default: the index's autotuned nprobe")
    g.add_argument("--rebuild-index", action="store_true",
                   help="index the bank again even when CURRENT has an index built with this config (after a "
                        "change to the index code)")
    g.add_argument("--k", type=int, default=10)
    g.add_argument("--queries", type=int, default=2000)
    g.add_argument("--noise", type=float, default=0.1, help="query = normalise(bank vector + noise·N(0, I/d))")
    g.add_argument("--batch-sizes", default="1,64")
    g.add_argument("--checkpoints", default="1,10,100", help="cold start: report after this many queries")
    g.add_argument("--simulate-slice-mb", default="1,4,16,64", help="cold start simulated for these slice sizes")
    g = p.add_argument_group("segmentation (small real bank)")
    g.add_argument("--encoder", default="clip-vit-b32", help="e.g. clip-vit-b32, tiny-clip (untrained weights)")
    g.add_argument("--seg-shards", type=int, default=2)
    g.add_argument("--seg-samples-per-shard", type=int, default=16)
    g.add_argument("--seg-heldout-shards", type=int, default=1)
    g.add_argument("--image-size", type=int, default=256)
    g.add_argument("--seg-rounds", type=int, default=5, help="passes over the held-out images")
    first, _ = p.parse_known_args(argv)
    if first.quick:
        p.set_defaults(**QUICK)
    return p.parse_args(argv)


def ms(seconds: float) -> float:
    return round(1000 * float(seconds), 3)


def pct(samples: list[float]) -> dict:
    """p50 / p99 / mean of seconds, in ms."""
    a = np.asarray(samples)
    return {"p50_ms": ms(np.percentile(a, 50)), "p99_ms": ms(np.percentile(a, 99)), "mean_ms": ms(a.mean())}


# --- kNN: the synthetic bank and its sliced index ---------------------------------------------------------------


def index_config(args: argparse.Namespace) -> IndexConfig:
    """The IndexConfig the kNN section builds (and reuses when the bank's index was built with it)."""
    base = IndexConfig(memory_target_bytes_per_vector=args.memory_target, flat_below=0,
                       refine=args.refine_factor > 0, refine_factor=max(args.refine_factor, 1),
                       slice_bytes=int(args.slice_mb * 2**20))
    return IndexConfig(**{**base.__dict__, "factory": args.factory})  # None: refbank's automatic choice


def ensure_index(bank: str, config: IndexConfig, rebuild: bool = False) -> dict:
    """Index the bank unless CURRENT already has an index built with this config (or `rebuild`); what was done."""
    want = json.loads(json.dumps(config_to_dict(config)))
    entry = manifest.read_manifest(bank).get("index")
    if entry and entry.get("config") == want and not rebuild:
        return {"reused": True}
    try:
        report = build_index(bank, config)
    finally:
        ray.shutdown()
    return {"reused": False, "build_s": report.timings_s}


def held_out_queries(bank: str, m: dict, config: IndexConfig, n: int, noise: float) -> tuple[np.ndarray, bool]:
    """(n bank vectors plus noise, L2-normalised, float32; whether all are outside the index's training sample —
    when the bank has fewer than n such rows, any bank rows are drawn)."""
    parts = sorted(m["parts"], key=lambda p: p["ordinal"])
    params = choose_params(sum(p["rows"] for p in parts), m["dims"]["visual"], config)
    plan = plan_sample(parts, params.n_train, params.n_queries, config.seed)
    starts = np.cumsum([0] + [p["rows"] for p in parts])
    free = np.concatenate([starts[i] + np.setdiff1d(np.arange(p["rows"]), plan[p["name"]][0])
                           for i, p in enumerate(parts)])
    held_out = len(free) >= n
    rng = np.random.default_rng(7)
    chosen = np.sort(rng.choice(free if held_out else starts[-1], n, replace=False))
    part_of = np.searchsorted(starts, chosen, side="right") - 1
    x = np.concatenate([read_rows(bank, p["name"], chosen[part_of == i] - starts[i], None)
                        for i, p in enumerate(parts) if (part_of == i).any()]).astype(np.float32)
    x = x[rng.permutation(len(x))]
    x += noise * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(x.shape[1])
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32), held_out


def monolithic(bank: str, m: dict, nprobe: int, refine_factor: int) -> tuple[faiss.Index, list, float]:
    """(IndexIDMap over [IndexRefineFlat over] the trained index with every vector added in part order,
    objects to keep alive, seconds to build)."""
    start = time.perf_counter()
    entry = m["index"]
    base = deserialize(layout.read_object(bank, entry["id"], entry["trained"], None))
    faiss.extract_index_ivf(base).nprobe = nprobe
    keep = [base]
    inner = base
    if refine_factor > 0:
        inner = faiss.IndexRefineFlat(base)  # exact re-rank of k·k_factor candidates by float32 vectors
        inner.k_factor = refine_factor
        keep.append(inner)
    index = faiss.IndexIDMap(inner)  # refine looks vectors up by sequential label: map to segment ids outside it
    for p in sorted(m["parts"], key=lambda p: p["ordinal"]):
        for t in iter_row_groups(bank, p["name"], ["segment_id", VISUAL], None):
            index.add_with_ids(matrix(t[VISUAL], np.float32), t["segment_id"].to_numpy())
    return index, keep, time.perf_counter() - start


def timed(fn, queries: np.ndarray, batch: int, min_seconds: float) -> tuple[float, np.ndarray, np.ndarray]:
    """(queries per second, scores, ids) of fn over the queries in batches of `batch`; whole passes over the
    queries are repeated until min_seconds have passed (the results are those of the first pass)."""
    scores, ids, done = [], [], 0
    start = time.perf_counter()
    while True:
        for i in range(0, len(queries), batch):
            s, d = fn(queries[i:i + batch])
            if not done:
                scores.append(s)
                ids.append(d)
        done += len(queries)
        seconds = time.perf_counter() - start
        if seconds >= min_seconds:
            return done / seconds, np.concatenate(scores), np.concatenate(ids)


def agreement(ids_a: np.ndarray, ids_b: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """How far two (nq, k) results agree: same id at the same rank, whole rows equal, same id sets."""
    same_set = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ids_a.tolist(), ids_b.tolist())])
    finite = np.isfinite(scores_a) & np.isfinite(scores_b)
    return {"ids_equal": round(float(np.mean(ids_a == ids_b)), 5),
            "rows_equal": round(float(np.mean((ids_a == ids_b).all(axis=1))), 5),
            "same_set": round(float(same_set), 5),
            "max_abs_score_diff": float(np.max(np.abs(scores_a - scores_b)[finite], initial=0.0))}


def knn(args: argparse.Namespace) -> tuple[dict, dict]:
    config = index_config(args)
    t = time.perf_counter()
    bank, _ = ensure_bank(argparse.Namespace(out=args.out, vectors=args.vectors, dim=args.dim, parts=args.parts,
                                             clusters=args.clusters, spread=args.spread))
    bank_s = time.perf_counter() - t
    built = ensure_index(bank, config, args.rebuild_index)
    opened = open_bank(bank)
    entry = opened.index
    nprobe = args.nprobe or entry["nprobe"]
    rf = entry["refine_factor"]
    slice_bytes = sum(s["bytes"] for s in entry["slices"])
    queries, held_out = held_out_queries(bank, opened.manifest, config, args.queries, args.noise)

    # Warm: a cache budget above everything the index holds, then one untimed pass loads every touched slice.
    cache = SliceCache(opened, cache_dir=None, memory_bytes=4 * slice_bytes + (1 << 30))
    searcher = BankSearcher(opened, cache)
    mono, _keep, mono_s = monolithic(bank, opened.manifest, nprobe, rf)
    if args.threads:  # after the builds (k-means and adds use every core), before anything is timed
        faiss.omp_set_num_threads(args.threads)

    def sliced_search(x):
        return searcher.search(x, args.k, nprobe=nprobe, refine_factor=rf)

    def mono_search(x):
        return mono.search(x, args.k)

    sliced_search(queries)
    mono_search(queries)
    misses = cache.stats()["misses"]
    batches = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        runs = {"sliced": [], "monolithic": []}
        for _ in range(args.repeat):  # alternate, so load from other work on the machine hits both alike
            s_qps, s_scores, s_ids = timed(sliced_search, queries, batch, args.min_seconds)
            m_qps, m_scores, m_ids = timed(mono_search, queries, batch, args.min_seconds)
            runs["sliced"].append(s_qps)
            runs["monolithic"].append(m_qps)
        s_qps, m_qps = max(runs["sliced"]), max(runs["monolithic"])
        batches[f"batch_{batch}"] = {
            "sliced_qps": round(s_qps, 1), "monolithic_qps": round(m_qps, 1),
            "sliced_ms_per_query": round(1000 / s_qps, 4), "monolithic_ms_per_query": round(1000 / m_qps, 4),
            "ratio": round(s_qps / m_qps, 3), "target_met": s_qps / m_qps >= 0.90,
            "ratio_median_runs": round(float(np.median(runs["sliced"]) / np.median(runs["monolithic"])), 3),
            "all_qps": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
            **agreement(s_ids, m_ids, s_scores, m_scores)}
    stats = cache.stats()
    ivf = faiss.extract_index_ivf(_keep[0])
    list_sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], np.int64)
    result = {
        "bank": {"vectors": args.vectors, "dim": args.dim, "parts": args.parts, "url": bank,
                 "ensure_s": round(bank_s, 2)},
        "index": {"factory": entry["factory"], "kind": entry["kind"], "nlist": entry["nlist"],
                  "code_size": entry["code_size"], "nprobe": nprobe, "tuned_nprobe": entry["nprobe"],
                  "refine_factor": rf, "tuned_recall_at_k": entry["recall_at_k"], "slices": len(entry["slices"]),
                  "slice_bytes": slice_bytes, "trained_bytes": entry["trained"]["bytes"], **built},
        "monolithic": {"build_s": round(mono_s, 2), "structure": "IndexIDMap(IndexRefineFlat(trained))" if rf
                       else "IndexIDMap(trained)", "vectors": int(mono.ntotal)},
        "k": args.k, "queries": len(queries), "noise": args.noise, "queries_held_out_of_training": held_out,
        "threads": {"faiss": faiss.omp_get_max_threads(), "cpus": os.cpu_count()},
        "warm_cache": {"resident_slices": stats["resident_slices"], "resident_bytes": stats["resident_bytes"],
                       "memory_bytes": stats["memory_bytes"], "evictions": stats["evictions"],
                       "misses_while_timed": stats["misses"] - misses},
        **batches,
    }
    del mono, _keep, searcher, cache
    gc.collect()
    cold = cold_start(args, opened, queries, nprobe, rf, list_sizes)
    return result, cold


def cold_start(args: argparse.Namespace, opened, queries: np.ndarray, nprobe: int, rf: int,
               list_sizes: np.ndarray) -> dict:
    """Bytes fetched from an empty cache as batch-1 queries arrive, measured; and simulated for other slice sizes."""
    entry = opened.index
    total = sum(s["bytes"] for s in entry["slices"])
    cache = SliceCache(opened, cache_dir=None, memory_bytes=4 * total + (1 << 30))
    t = time.perf_counter()
    searcher = BankSearcher(opened, cache)  # fetches the trained index (quantizer + code tables) once
    open_s = time.perf_counter() - t
    trained = cache.stats()["bytes_fetched"]
    marks = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= len(queries)} | {len(queries)})
    after, latencies, all_fetched = {}, [], None
    for i in range(len(queries)):
        t = time.perf_counter()
        searcher.search(queries[i:i + 1], args.k, nprobe=nprobe, refine_factor=rf)
        latencies.append(time.perf_counter() - t)
        if all_fetched is None and cache.stats()["fetches"] - 1 == len(entry["slices"]):
            all_fetched = i + 1
        if i + 1 in marks:
            s = cache.stats()
            after[str(i + 1)] = {"bytes": s["bytes_fetched"] - trained, "fraction": round((s["bytes_fetched"] - trained)
                                                                                          / total, 4),
                                 "slices": s["fetches"] - 1, "fetch_s": s["fetch_seconds"]}
    # The same, simulated: which slices the probed lists fall in, for slices planned at other target sizes.
    _, _, lists = searcher.index.probe(queries, nprobe)
    record = record_dtype(entry["code_size"], opened.dims["visual"], rf > 0).itemsize
    list_bytes = list_sizes * record
    simulated = {}
    sizes = [float(v) for v in args.simulate_slice_mb.split(",")] + [args.slice_mb]
    for mb in sorted(set(sizes)):
        ranges = plan_slices(list_bytes, int(mb * 2**20))
        starts = np.array([lo for lo, _ in ranges])
        owned = np.searchsorted(starts, lists, side="right") - 1
        sbytes = np.array([list_bytes[lo:hi].sum() for lo, hi in ranges])
        row = {"slices": len(ranges)}
        for mark in marks:
            row[str(mark)] = round(float(sbytes[np.unique(owned[:mark])].sum() / sbytes.sum()), 4)
        simulated[f"{mb:g}"] = row
    return {"slices": len(entry["slices"]), "slice_bytes": total, "trained_bytes": trained,
            "open_s": round(open_s, 3), "first_query_ms": ms(latencies[0]),
            "queries_until_every_slice_fetched": all_fetched,
            "after_queries": after,
            "latency_first_100": pct(latencies[:100]), "latency_rest": pct(latencies[100:]) if len(latencies) > 100
            else None,
            "simulated_fraction_by_slice_mb": simulated}


# --- segmentation: a small real bank ----------------------------------------------------------------------------


def ensure_seg_bank(args: argparse.Namespace) -> tuple[str, list[str], dict]:
    """(bank URL, held-out shard URLs, what was done): corpus + build_bank + build_index, reused per shape."""
    shape = {"encoder": args.encoder, "shards": args.seg_shards, "samples_per_shard": args.seg_samples_per_shard,
             "heldout_shards": args.seg_heldout_shards, "image_size": args.image_size}
    root = os.path.abspath(os.path.join(args.out, "seg-{encoder}-{shards}x{samples_per_shard}-{image_size}px"
                                        .format(**shape)))
    marker, bank = os.path.join(root, "bench.json"), os.path.join(root, "bank")
    if os.path.exists(marker) and json.load(open(marker))["shape"] == shape:
        saved = json.load(open(marker))
        return bank, saved["heldout"], {"reused": True}
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    summary = make_corpus(os.path.join(root, "corpus"), CorpusConfig(
        shards=args.seg_shards, samples_per_shard=args.seg_samples_per_shard, image_size=args.image_size,
        heldout_shards=args.seg_heldout_shards, seed=0))
    config = BuildConfig(source=os.path.join(root, "corpus", "train-*.tar"), bank=bank,
                         encoder=EncoderConfig(name=args.encoder, weights="untrained", seed=0),
                         pipeline=PipelineConfig(batch_size=8, progress_interval_s=0.0))
    init_ray(num_cpus=os.cpu_count())
    try:
        report = build_bank(config)
        if not report.ok:
            sys.exit(f"build failed: {report.failed}")
        indexed = build_index(bank, IndexConfig(autotune_queries=50, nprobe_candidates=(1, 4, 16)))
    finally:
        ray.shutdown()
    json.dump({"shape": shape, "heldout": summary.heldout}, open(marker, "w"))
    return bank, summary.heldout, {"reused": False, "build_s": round(time.perf_counter() - t, 2),
                                   "segments": report.segments, "index": indexed.factory}


def segmentation(args: argparse.Namespace) -> dict:
    bank_url, heldout, built = ensure_seg_bank(args)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    bank = open_bank(bank_url)
    encoder = load_encoder(encoder_config(bank.manifest["encoder"]))  # as the service loads it
    spec = encoder.spec
    searcher = BankSearcher(bank, SliceCache(bank))
    segmenter = Segmenter(encoder, searcher, bank, label_table(bank), RegionConfig())
    images = [s.image for shard in heldout for s in iter_samples(shard, IngestConfig()) if not isinstance(s, Reject)]
    classes = list(class_names())
    inputs = [prepare_image(image, [], spec)[0][None] for image in images]  # the forward's own (1, S, S, 3) input

    t = time.perf_counter()
    segmenter.vocabulary(images[0], classes)  # first call: encodes the class names' text (cached after)
    first_s = time.perf_counter() - t
    encoder.encode_dense(inputs[0])
    names = ["vocabulary", "bare_forward", "superpixels", "resize_and_soft_masks", "forward", "pooling",
             "score_and_assemble"]
    times: dict[str, list[float]] = {n: [] for n in names}
    regions_per_image = []

    def clock(name, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        times[name].append(time.perf_counter() - t0)
        return out

    for r in range(args.seg_rounds):
        for i, image in enumerate(images):
            order = (0, 1) if (r + i) % 2 == 0 else (1, 0)  # alternate which of the two goes first
            for which in order:
                if which == 0:
                    clock("vocabulary", segmenter.vocabulary, image, classes)
                else:
                    clock("bare_forward", encoder.encode_dense, inputs[i])
            # The vocabulary call, piece by piece (what image_regions + vocabulary do, in order).
            masks = clock("superpixels", region_masks, image, segmenter.region_config, spec.grid)
            resized, soft = clock("resize_and_soft_masks", prepare_image, image, list(masks), spec)
            features = clock("forward", encoder.encode_dense, resized[None])
            with torch.inference_mode():
                visual, _ = clock("pooling", pool_segments, features, torch.as_tensor(soft),
                                  torch.zeros(len(masks), dtype=torch.int64))
            clock("score_and_assemble", segmenter.vocabulary, Regions(masks, visual.astype(np.float32)), classes)
            if r == 0:
                regions_per_image.append(len(masks))
    stats = {n: pct(v) for n, v in times.items()}
    p50 = {n: s["p50_ms"] for n, s in stats.items()}
    parts_sum = sum(p50[n] for n in names[2:])
    return {
        "encoder": spec.name, "untrained": spec.untrained, "encoder_input": spec.image_size,
        "bank": {"url": bank_url, "segments": bank.manifest["totals"]["segments"], **built},
        "images": len(images), "image_size": args.image_size, "rounds": args.seg_rounds, "classes": len(classes),
        "regions_per_image_mean": round(float(np.mean(regions_per_image)), 1),
        "torch_threads": torch.get_num_threads(), "first_call_ms": ms(first_s),
        "latency": stats,
        "ratio_p50": round(p50["vocabulary"] / p50["bare_forward"], 3),
        "ratio_p99": round(stats["vocabulary"]["p99_ms"] / stats["bare_forward"]["p99_ms"], 3),
        "ratio_p99_over_forward_p50": round(stats["vocabulary"]["p99_ms"] / p50["bare_forward"], 3),
        "target_met": max(p50["vocabulary"] / p50["bare_forward"],
                          stats["vocabulary"]["p99_ms"] / stats["bare_forward"]["p99_ms"]) <= 1.25,
        "share_of_vocabulary_p50": {n: round(p50[n] / p50["vocabulary"], 3) for n in names[2:]},
        "pieces_p50_sum_ms": round(parts_sum, 3),
    }


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    out: dict = {"config": {k: v for k, v in vars(args).items()}, "cpus": os.cpu_count()}
    if args.only in (None, "knn"):
        out["knn"], out["cold_start"] = knn(args)
    if args.only in (None, "segmentation"):
        out["segmentation"] = segmentation(args)
    out["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
