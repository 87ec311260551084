"""The synthetic bank the index and query benchmarks share: clustered unit vectors written as Parquet parts.

Written once per shape under `out` (a marker file records the shape) and reused by later runs. Queries are
fresh draws around the same cluster centers (not bank vectors). `ground_truth` streams every part once.
"""

from __future__ import annotations

import json
import os

import faiss
import numpy as np

from bank_builder.format import BankRef, PartEntry, make_manifest, parts, publish, read_current, read_manifest

VISUAL = parts.VISUAL


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of x divided by their norms, float32."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, centers: np.ndarray, n: int, spread: float) -> np.ndarray:
    """n unit vectors scattered around random centers (larger spread: harder search)."""
    d = centers.shape[1]
    return unit(centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d))


def ensure_bank(out: str, vectors: int, dim: int, n_parts: int, clusters: int,
                spread: float) -> tuple[str, np.ndarray]:
    """(bank URL, cluster centers): written once per shape, reused when the marker says it matches."""
    bank = os.path.abspath(os.path.join(out, f"bank-{vectors}x{dim}"))
    marker = os.path.join(bank, "bench.json")
    shape = {"vectors": vectors, "dim": dim, "parts": n_parts, "clusters": clusters, "spread": spread, "format": 3}
    if os.path.exists(marker) and json.load(open(marker)) == shape:
        return bank, np.load(os.path.join(bank, "centers.npy"))
    ref = BankRef(bank)
    if os.path.exists(bank):
        import shutil

        shutil.rmtree(bank)
    rng = np.random.default_rng(0)
    centers = unit(rng.standard_normal((clusters, dim)))
    sizes = np.diff(np.linspace(0, vectors, n_parts + 1).astype(int))
    infos = write_parts(ref, rng, centers, sizes, 0, "part", spread)
    spec = {"name": "synthetic", "visual_dim": dim, "text_dim": 32}
    publish(ref, make_manifest(infos, spec, "bench", {}), read_current(ref))
    np.save(os.path.join(bank, "centers.npy"), centers)
    json.dump(shape, open(marker, "w"))
    return bank, centers


def write_parts(ref: BankRef, rng: np.random.Generator, centers: np.ndarray, sizes: np.ndarray, first_ordinal: int,
                prefix: str, spread: float) -> list[PartEntry]:
    """Parts of clustered vectors (one per entry of `sizes`, ordinals from `first_ordinal`) with one of 200
    labels each (a 32-d text embedding per label); their committed entries."""
    label_text = unit(np.random.default_rng(1).standard_normal((200, 32))).astype(np.float16)
    infos = []
    for i, n in enumerate(int(n) for n in sizes):
        ordinal, name = first_ordinal + i, f"{prefix}-{first_ordinal + i:05d}"
        x = clustered(rng, centers, n, spread).astype(np.float16)
        which = rng.integers(0, len(label_text), n)
        rows = parts.SegmentRows(image_key=[f"{name}/{j}" for j in range(n)], segment_index=[0] * n,
                                 label=[f"label-{w}" for w in which], label_source=["ground_truth"] * n,
                                 bbox=[(0, 0, 1, 1)] * n, area=[1] * n, rle=[{"size": [1, 1], "counts": "1"}] * n,
                                 mask_kind=["instance"] * n)
        table = parts.part_table(name, ordinal, rows, x, np.ones(n, np.float32), list(label_text[which]), 32)
        info = PartEntry(name, ordinal, f"synthetic://{name}", n, 0, "", n, 0, {}, "bench")
        infos.append(parts.write_part(ref, table, info, {"name": "synthetic"}))
    return infos


def read_all(bank: str) -> tuple[np.ndarray, np.ndarray]:
    """(every vector (N, C) float32, segment ids (N,)) of the bank's CURRENT parts, in part order."""
    ref = BankRef(bank)
    entries = sorted(read_manifest(ref).parts, key=lambda p: p.ordinal)
    n = sum(p.rows for p in entries)
    x, ids, at = None, np.empty(n, np.int64), 0
    for p in entries:  # filled in place: peak memory is the matrix itself, not a list of chunks plus a copy
        for t in parts.iter_row_groups(ref, p.name, ["segment_id", VISUAL]):
            block = parts.matrix(t[VISUAL], np.float32)
            if x is None:
                x = np.empty((n, block.shape[1]), np.float32)
            x[at:at + t.num_rows], ids[at:at + t.num_rows] = block, t["segment_id"].to_numpy()
            at += t.num_rows
    return x, ids


def ground_truth(bank: str, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k segment ids over every part, streamed (faiss.knn per row group + ResultHeap)."""
    ref = BankRef(bank)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for p in read_manifest(ref).parts:
        for t in parts.iter_row_groups(ref, p.name, ["segment_id", VISUAL]):
            scores, rows = faiss.knn(queries, parts.matrix(t[VISUAL], np.float32), k,
                                     metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, t["segment_id"].to_numpy()[rows])
    heap.finalize()
    return heap.I
