"""Add in parallel: one Ray task per part encodes the part's vectors with the shared trained index and writes
its inverted lists as one staging object laid out by list, so a slice builder reads only its list range.

Staging object of a part (little-endian, no header; nlist, code size, C and refine come from the manifest):
  offsets  int64[nlist + 1]   entries of list l are records offsets[l] .. offsets[l+1]
  records  RECORD[n]          sorted by list, rows in part order within a list;
                              RECORD = (id int64, code uint8[code_size][, vector float16[C]])

Encoding is what IndexIVF.add_with_ids does (coarse-assign with the quantizer, then encode_vectors on the
assigned lists), so the codes equal those of one monolithic index built from the same trained index.
The same pass computes, per part, the exact top-k of the autotune queries (exact.TopK, on the float32 rows it
encodes anyway) and the part's label texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import ray

from bank_builder import storage
from bank_builder.index import layout, source
from bank_builder.index.exact import TopK
from bank_builder.index.params import apply_chain, split_index
from bank_builder.index.train import deserialize


def record_dtype(code_size: int, dim: int, refine: bool) -> np.dtype:
    """The packed record of one stored vector: id, code, and the float16 vector when refine is on."""
    fields: list[tuple] = [("id", "<i8"), ("code", "u1", (code_size,))]
    if refine:
        fields.append(("vector", "<f2", (dim,)))
    return np.dtype(fields)


@dataclass
class PartAdded:
    """What one add task reports back: list sizes, exact neighbours of the queries, label texts."""

    name: str
    rows: int
    list_sizes: np.ndarray  # (nlist,) int64
    exact_scores: np.ndarray  # (n_queries, k) float32 inner products, best first
    exact_ids: np.ndarray  # (n_queries, k) int64 segment ids (-1 where the part has fewer than k rows)
    labels: list[str] = field(default_factory=list)
    text: np.ndarray | None = None  # (len(labels), D) float16, the first text embedding of each label
    visual_sums: np.ndarray | None = None  # (len(labels), C) float64, sum of each label's visual embeddings
    counts: np.ndarray | None = None  # (len(labels),) segments per label


def encode(chain: list, ivf: faiss.IndexIVF, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(list number (n,) int64, code (n, code_size) uint8) of vectors x (n, C) float32."""
    xt = np.ascontiguousarray(apply_chain(chain, x), dtype=np.float32)
    _, assign = ivf.quantizer.search(xt, 1)
    lists = np.ascontiguousarray(assign[:, 0])
    codes = np.empty((len(x), ivf.code_size), dtype=np.uint8)
    ivf.encode_vectors(len(x), faiss.swig_ptr(xt), faiss.swig_ptr(lists), faiss.swig_ptr(codes), False)
    return lists, codes


class _Labels:
    """Per label of a part: the first text embedding seen, and the sum and count of its visual embeddings."""

    def __init__(self) -> None:
        self.seen: dict[str, np.ndarray] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, table, x: np.ndarray) -> None:
        """Take the labelled rows of a row group; x (rows, C) float32 are its visual embeddings."""
        valid = (table["label"].is_valid().to_numpy(zero_copy_only=False)
                 & table["text_embedding"].is_valid().to_numpy(zero_copy_only=False))
        if not valid.any():
            return
        labels = np.array(table["label"].to_pylist(), dtype=object)[valid]
        text = source.matrix(table["text_embedding"])[valid]
        names, first, inverse = np.unique(labels.astype(str), return_index=True, return_inverse=True)
        counts = np.bincount(inverse, minlength=len(names))
        # Rows grouped by label, then one reduceat: np.add.at would cost as much as encoding the rows.
        order = np.argsort(inverse, kind="stable")
        sums = np.add.reduceat(x[valid][order], np.cumsum(counts) - counts, axis=0, dtype=np.float64)
        for j, (name, i) in enumerate(zip(names, first)):
            name = str(name)
            self.seen.setdefault(name, text[i])
            self.sums[name] = self.sums.get(name, 0.0) + sums[j]
            self.counts[name] = self.counts.get(name, 0) + int(counts[j])

    def arrays(self) -> tuple[list[str], np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(sorted labels, text (L, D) float16, visual sums (L, C) float64, counts (L,)); Nones without labels."""
        names = sorted(self.seen)
        if not names:
            return names, None, None, None
        return (names, np.stack([self.seen[n] for n in names]), np.stack([self.sums[n] for n in names]),
                np.array([self.counts[n] for n in names], np.int64))


def add_part(bank: str, part: dict, trained: bytes, staging: str, queries: np.ndarray, k: int,
             refine: bool, text: bool, storage_options: dict[str, Any] | None) -> PartAdded:
    """Encode one part row group by row group; write its staging object; return sizes, exact top-k, labels."""
    faiss.omp_set_num_threads(1)  # one task = one CPU; parallelism comes from running tasks side by side
    index = deserialize(trained)
    chain, ivf = split_index(index)
    dtype = record_dtype(ivf.code_size, index.d, refine)
    exact = TopK(queries, k)
    labels = _Labels()
    lists, records = [], []
    columns = ["segment_id", source.VISUAL] + (["label", "text_embedding"] if text else [])
    for table in source.iter_row_groups(bank, part["name"], columns, storage_options):
        x16 = source.matrix(table[source.VISUAL])
        ids = table["segment_id"].to_numpy()
        x = x16.astype(np.float32)
        exact.add(x, ids)
        assign, codes = encode(chain, ivf, x)
        rec = np.empty(len(x), dtype=dtype)
        rec["id"], rec["code"] = ids, codes
        if refine:
            rec["vector"] = x16
        lists.append(assign)
        records.append(rec)
        if text:
            labels.add(table, x)
    assign = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    order = np.argsort(assign, kind="stable")  # by list; part row order kept within a list
    sizes = np.bincount(assign, minlength=ivf.nlist).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype("<i8")
    body = np.concatenate(records)[order] if records else np.zeros(0, dtype)
    storage.write_bytes(staging, offsets.tobytes() + body.tobytes(), storage_options)
    names, vectors, sums, counts = labels.arrays()
    return PartAdded(part["name"], len(assign), sizes, exact.scores, exact.ids, names, vectors, sums, counts)


@dataclass
class AddResult:
    """All parts added: total list sizes, exact top-k of the queries over the whole bank, label texts."""

    list_sizes: np.ndarray  # (nlist,) int64
    rows: dict[str, int]  # part name → vectors
    exact_scores: np.ndarray
    exact_ids: np.ndarray
    labels: dict[str, np.ndarray]  # label → text embedding (float16), first seen in part-ordinal order
    visual_sums: dict[str, np.ndarray]  # label → sum of its segments' visual embeddings (float64)
    counts: dict[str, int]  # label → number of segments


def add_parts(bank: str, index_id: str, parts: list[dict], trained: bytes, nlist: int, queries: np.ndarray,
              k: int, refine: bool, text: bool, storage_options: dict[str, Any] | None) -> AddResult:
    """Run one add task per part; merge what they report as they finish."""
    task = ray.remote(num_cpus=1, max_retries=2)(add_part)  # a retry rewrites the same staging object
    trained_ref, queries_ref = ray.put(trained), ray.put(np.ascontiguousarray(queries, np.float32))
    pending = {task.remote(bank, p, trained_ref, layout.staging_url(bank, index_id, p["name"]), queries_ref,
                           k, refine, text, storage_options): p for p in parts}
    sizes = np.zeros(nlist, np.int64)
    exact = TopK(queries, k)
    rows, by_part = {}, {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        part = pending.pop(done[0])
        added: PartAdded = ray.get(done[0])
        if added.rows != part["rows"]:
            raise layout.IndexCorruptError(f"part {part['name']} has {added.rows} rows but the manifest says "
                                           f"{part['rows']}; the part changed after it was committed")
        sizes += added.list_sizes
        exact.merge(added.exact_scores, added.exact_ids)
        rows[part["name"]] = added.rows
        by_part[part["ordinal"]] = added
    labels: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for ordinal in sorted(by_part):
        added = by_part[ordinal]
        for i, name in enumerate(added.labels):
            labels.setdefault(name, added.text[i])
            sums[name] = sums.get(name, 0.0) + added.visual_sums[i]
            counts[name] = counts.get(name, 0) + int(added.counts[i])
    return AddResult(sizes, rows, exact.scores, exact.ids, labels, sums, counts)
