"""Checksums on part reads: per object (sha256 of the whole part, as the manifest records it) against per row
group (Parquet page CRC32s checked as pages decode, plus the footer's sha256), on one realistic part.

    python bench/part_checksums.py --rows 20000 --flips 200 --detect-rows 8192

The part: `--rows` segments of a CLIP-B-sized bank (512-d float16 visual and text embeddings, labels from 200
names, COCO-RLE masks of 40-300 characters), 4096-row row groups, zstd: what a shard of ~700 images gives. It
lives on a moto S3 server on 127.0.0.1. Measured, best of --repeat:
  query miss   what a metadata lookup reads: one row group's metadata columns (one ranged GET), decoded
               — per row group: verified as decoded; per object: the whole object fetched and hashed first
  index scan   what `refbank index` reads: visual + label columns of every row group (unverified, pages
               verified, or the whole object fetched and hashed first), and the same scan from memory (the CPU
               cost of page verification alone)
  write        serialising the part with and without page CRCs (size and time)
  detection    --flips seeded single-bit flips over a --detect-rows part, anywhere and in the footer alone; for
               each scheme, how many a full read refuses, how many change no decoded value (bytes no reader
               uses), how many change data silently
Prints one JSON object. Times are wall-clock on whatever else the machine is doing: compare within a run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

sys.path[0] = str(Path(__file__).resolve().parents[1])  # this checkout, not bench/ (bench/query.py shadows query)
from bank_builder.format import parts, storage  # noqa: E402
from bench.s3_requests import load_fault_proxy  # noqa: E402

METADATA = ["segment_id", "part", "image_key", "segment_index", "label", "label_source", "bbox", "area", "mask",
            "mask_kind", "quality"]


def realistic_table(rows: int, seed: int = 0) -> pa.Table:
    """A part table shaped like a CLIP ViT-B/16 bank's (C = D = 512)."""
    rng = np.random.default_rng(seed)
    seg = parts.SegmentRows()
    labels = [f"label-{i:03d}" for i in range(200)]
    for i in range(rows):
        seg.image_key.append(f"img-{i // 30:06d}")
        seg.segment_index.append(i % 30)
        seg.label.append(labels[int(rng.integers(200))])
        seg.label_source.append("ground_truth")
        seg.bbox.append(tuple(int(v) for v in rng.integers(0, 512, 4)))
        seg.area.append(int(rng.integers(50, 50000)))
        counts = "".join(chr(48 + int(c)) for c in rng.integers(0, 60, int(rng.integers(40, 300))))
        seg.rle.append({"size": [512, 512], "counts": counts})
        seg.mask_kind.append("instance")
    visual = rng.standard_normal((rows, 512)).astype(np.float32)
    visual /= np.linalg.norm(visual, axis=1, keepdims=True)
    text = rng.standard_normal((rows, 512)).astype(np.float16)
    return parts.part_table("p", 0, seg, visual.astype(np.float16), rng.random(rows).astype(np.float32),
                            list(text), 512)


def best(variants: dict, repeat: int) -> dict[str, float]:
    """Fastest of `repeat` runs of each variant, seconds; the variants take turns, so load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: round(min(t), 4) for name, t in times.items()}


def serialise(table: pa.Table, crc: bool) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=4096, compression="zstd", write_page_checksum=crc)
    return sink.getvalue()


def detection(data: bytes, flips: int, seed: int) -> dict[str, dict[str, dict[str, int]]]:
    """Outcomes of single-bit flips under each scheme, reading every column of every row group: flips anywhere in
    the object (nearly all land in data pages), and flips in the footer alone. "page CRC only" is the per-row-group
    scheme without the footer's sha256, to show what that digest adds."""
    clean = pq.ParquetFile(io.BytesIO(data)).read()
    digest, footer_digest = hashlib.sha256(data).hexdigest(), parts.footer_sha256(data)
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    rng = random.Random(seed)
    out: dict[str, dict[str, dict[str, int]]] = {}
    for region, low in (("anywhere", 0), ("footer", footer_start)):
        counts = {scheme: {"refused": 0, "unused_byte": 0, "silent_change": 0}
                  for scheme in ("per_object", "per_row_group", "page_crc_only")}
        for _ in range(flips):
            damaged = bytearray(data)
            damaged[rng.randrange(low, len(data))] ^= 1 << rng.randrange(8)
            damaged = bytes(damaged)
            counts["per_object"]["refused" if hashlib.sha256(damaged).hexdigest() != digest else "unused_byte"] += 1
            try:
                table = pq.ParquetFile(io.BytesIO(damaged), page_checksum_verification=True).read()
                outcome = "unused_byte" if table.equals(clean) else "silent_change"
            except Exception:  # noqa: BLE001 - any refusal counts
                outcome = "refused"
            counts["page_crc_only"][outcome] += 1
            footer_ok = parts.footer_sha256(damaged) == footer_digest
            counts["per_row_group"][outcome if footer_ok else "refused"] += 1
        out[region] = counts
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--flips", type=int, default=200, help="per region (anywhere, footer)")
    p.add_argument("--detect-rows", type=int, default=8192, help="rows of the (smaller) part the flips go to")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    table = realistic_table(args.rows, args.seed)
    write = best({"no_crc": lambda: serialise(table, False), "page_crc": lambda: serialise(table, True)},
                 args.repeat)
    data, plain = serialise(table, True), serialise(table, False)
    footer = pq.read_metadata(io.BytesIO(data))

    server, endpoint, bucket = load_fault_proxy().moto_with_bucket()
    so = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
    url = f"s3://{bucket}/part.parquet"
    storage.write_bytes(url, data, so)

    group = footer.num_row_groups // 2
    start, end = parts.column_span(footer, group, METADATA)

    def miss_per_row_group() -> None:
        blob = storage.read_range(url, start, end, so)
        f = storage.RangeFile(url, len(data), so, [(start, blob)])
        pq.ParquetFile(f, metadata=footer, page_checksum_verification=True).read_row_group(group, columns=METADATA)

    def miss_per_object() -> None:
        whole = storage.read_bytes(url, so)
        assert hashlib.sha256(whole).hexdigest()
        pq.ParquetFile(io.BytesIO(whole), metadata=footer).read_row_group(group, columns=METADATA)

    def scan(verify: bool, whole: bool) -> None:
        """visual + label of every row group, from S3: the chunks alone, or the whole object hashed first."""
        if whole:
            blob = storage.read_bytes(url, so)
            assert hashlib.sha256(blob).hexdigest()
            f = pq.ParquetFile(io.BytesIO(blob), metadata=footer)
        else:
            f = pq.ParquetFile(storage.RangeFile(url, len(data), so), metadata=footer, pre_buffer=True,
                               page_checksum_verification=verify)
        for g in range(f.num_row_groups):
            f.read_row_group(g, columns=["visual_embedding", "label"])

    def scan_in_memory(verify: bool) -> None:
        """The same scan from bytes in memory: the CPU cost of verifying, without the network."""
        f = pq.ParquetFile(io.BytesIO(data), metadata=footer, page_checksum_verification=verify)
        for g in range(f.num_row_groups):
            f.read_row_group(g, columns=["visual_embedding", "label"])

    scan_bytes = sum(footer.row_group(g).column(i).total_compressed_size for g in range(footer.num_row_groups)
                     for i in range(footer.num_columns)
                     if footer.row_group(g).column(i).path_in_schema.split(".")[0] in ("visual_embedding", "label"))
    miss = best({"per_row_group": miss_per_row_group, "per_object": miss_per_object}, args.repeat)
    scans = best({"unverified_s": lambda: scan(False, False), "per_row_group_s": lambda: scan(True, False),
                  "per_object_s": lambda: scan(False, True)}, args.repeat)
    result = {
        "part": {"rows": args.rows, "bytes": len(data), "row_groups": footer.num_row_groups,
                 "footer_bytes": footer.serialized_size, "crc_overhead_bytes": len(data) - len(plain)},
        "write_s": write,
        "query_miss": {
            "per_row_group": {"bytes": end - start, "requests": 1, "s": miss["per_row_group"]},
            "per_object": {"bytes": len(data), "requests": 1, "s": miss["per_object"]},
        },
        "index_scan": {**scans, "bytes_read_per_row_group": scan_bytes, "bytes_read_per_object": len(data)},
        "index_scan_in_memory": best({"unverified_s": lambda: scan_in_memory(False),
                                      "pages_verified_s": lambda: scan_in_memory(True)}, args.repeat),
        "sha256_whole_object_s": best({"sha256": lambda: hashlib.sha256(data).hexdigest()}, args.repeat)["sha256"],
        "detection": detection(serialise(realistic_table(args.detect_rows, args.seed + 1), True), args.flips,
                               args.seed),
    }
    print(json.dumps(result, indent=1))
    server.stop()


if __name__ == "__main__":
    main()
