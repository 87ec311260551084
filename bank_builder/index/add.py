"""Add in parallel: one Ray task per part encodes the part's vectors with the shared trained index and writes
its inverted lists as one staging object laid out by list, so a list-object builder reads only its list range.

Staging object of a part (little-endian, no header; nlist, code size, C and refine come from the manifest):
  offsets  int64[nlist + 1]   entries of list l are records offsets[l] .. offsets[l+1]
  records  RECORD[n]          sorted by list, rows in part order within a list;
                              RECORD = (id int64, code uint8[code_size][, vector float16[C]])

Encoding is what IndexIVF.add_with_ids does (coarse-assign with the quantizer, then encode_vectors on the
assigned lists), so the codes equal those of one monolithic index built from the same trained index.
The same pass computes, per part, the exact top-k of the autotune queries (exact.TopK, on the float32 rows it
encodes anyway) and the part's labels: their text embeddings and the sums of their visual embeddings.
A curated part (bank_builder.curate) contributes only the rows its curation keeps: to the lists, the exact top-k
and the label sums alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import ray

from bank_builder.format import BankRef, IndexCorruptError, PartEntry, index_layout, parts, storage
from bank_builder.format.curation import keep_mask
from bank_builder.index.exact import TopK
from bank_builder.format.trained import apply_chain, deserialize, split_index


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
    rows: int  # vectors added (the rows its curation keeps)
    list_sizes: np.ndarray  # (nlist,) int64
    exact_scores: np.ndarray  # (n_queries, k) float32 inner products, best first
    exact_ids: np.ndarray  # (n_queries, k) int64 segment ids (-1 where the part has fewer than k rows)
    labels: list[str] = field(default_factory=list)
    text: np.ndarray | None = None  # (len(labels), D) float16, the first text embedding of each label
    visual_sums: np.ndarray | None = None  # (len(labels), C) float64, sum of each label's visual embeddings
    counts: np.ndarray | None = None  # (len(labels),) segments per label
    coarse_sum: float = 0.0  # sum over its vectors of the inner product with their list's centroid
    read: int = 0  # rows read (every row of the part)


def encode(chain: list, ivf: faiss.IndexIVF, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(list number (n,) int64, code (n, code_size) uint8, sum of the coarse scores) of vectors x (n, C) float32;
    a vector's coarse score is its inner product with its list's centroid (the lower, the farther it lies)."""
    xt = np.ascontiguousarray(apply_chain(chain, x), dtype=np.float32)
    scores, assign = ivf.quantizer.search(xt, 1)
    lists = np.ascontiguousarray(assign[:, 0])
    codes = np.empty((len(x), ivf.code_size), dtype=np.uint8)
    ivf.encode_vectors(len(x), faiss.swig_ptr(xt), faiss.swig_ptr(lists), faiss.swig_ptr(codes), False)
    return lists, codes, float(scores.sum(dtype=np.float64))


class _Labels:
    """Per label of a part: the first text embedding seen, and the sum and count of its visual embeddings.

    Labels are read dictionary-encoded, so a row group costs one bincount and one reduceat over integer codes,
    and its text column is read only when it holds a label not seen before."""

    def __init__(self, dim: int) -> None:
        self.slot: dict[str, int] = {}  # label → row of sums / counts, in order of first appearance
        self.text: dict[str, np.ndarray] = {}
        self.sums = np.zeros((0, dim), np.float64)
        self.counts = np.zeros(0, np.int64)

    def add(self, labels: pa.ChunkedArray, x: np.ndarray, read_text: Callable[[], pa.ChunkedArray]) -> None:
        """Take a row group's label column and x (rows, C) float32, its visual embeddings; `read_text` reads
        its text embedding column. Rows without a label count nowhere; a label with no text embedding in any
        row gets none (and no entry in the text index)."""
        offset, text = 0, None
        for chunk in labels.chunks:
            codes = chunk.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            names = chunk.dictionary.to_pylist()
            rows = slice(offset, offset + len(chunk))
            offset += len(chunk)
            counts = np.bincount(codes[codes >= 0], minlength=len(names))
            present = np.flatnonzero(counts)
            if not len(present):
                continue
            # Rows grouped by label, then one reduceat: np.add.at would cost as much as encoding the rows. A row
            # group's sums stay in float32 (≤ 4096 unit vectors each); the part's totals are float64.
            order = np.argsort(np.where(codes >= 0, codes, len(names)), kind="stable")[:int(counts.sum())]
            sums = np.add.reduceat(x[rows][order], np.cumsum(counts[present]) - counts[present], axis=0)
            slots = np.array([self._slot(names[c]) for c in present], np.int64)
            self.sums[slots] += sums
            self.counts[slots] += counts[present]
            if any(names[c] not in self.text for c in present):
                text = read_text() if text is None else text
                self._take_text(names, codes, text.slice(rows.start, len(codes)))

    def _slot(self, name: str) -> int:
        if name not in self.slot:
            self.slot[name] = len(self.slot)
            self.sums = np.vstack([self.sums, np.zeros((1, self.sums.shape[1]))])
            self.counts = np.append(self.counts, 0)
        return self.slot[name]

    def _take_text(self, names: list[str], codes: np.ndarray, text: pa.ChunkedArray) -> None:
        """Record the first text embedding of each label in `codes` that has none yet."""
        with_text = (codes >= 0) & text.is_valid().to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(with_text)
        found, first = np.unique(codes[rows], return_index=True)
        vectors = parts.matrix(text)
        for code, row in zip(found, rows[first]):
            self.text.setdefault(names[code], vectors[row])

    def arrays(self) -> tuple[list[str], np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(sorted labels, text (L, D) float16, visual sums (L, C) float64, counts (L,)); Nones without labels."""
        names = sorted(self.text)
        if not names:
            return names, None, None, None
        slots = [self.slot[n] for n in names]
        return names, np.stack([self.text[n] for n in names]), self.sums[slots], self.counts[slots]


def add_part(ref: BankRef, part: PartEntry, trained: bytes, staging: str, exact: TopK, refine: bool,
             text: bool, curation: str | None = None) -> PartAdded:
    """Encode one part row group by row group; write its staging object; return sizes, exact top-k, labels.

    exact: an empty TopK of the autotune queries (with their floors); this part's vectors are streamed into it.
    curation: the part's curation object (format.curation); only the rows it keeps are added. None: every row."""
    faiss.omp_set_num_threads(1)  # one task = one CPU; parallelism comes from running tasks side by side
    exact = exact.fresh()
    index = deserialize(trained)
    chain, ivf = split_index(index)
    dtype = record_dtype(ivf.code_size, index.d, refine)
    labels = _Labels(index.d)
    lists, records, coarse, read = [], [], 0.0, 0
    columns = ["segment_id", parts.VISUAL] + (["label"] if text else [])
    keep = keep_mask(ref, curation, part.rows)
    with parts.open_part(ref, part.name, dictionary=["label"]) as f:
        for g in range(f.num_row_groups):
            table = f.read_row_group(g, columns=columns)
            kept = None if keep is None else pa.array(keep[read:read + table.num_rows])
            read += table.num_rows
            table = table if kept is None else table.filter(kept)
            x16 = parts.matrix(table[parts.VISUAL])
            ids = table["segment_id"].to_numpy()
            x = x16.astype(np.float32)
            exact.add(x, ids)
            assign, codes, scored = encode(chain, ivf, x)
            coarse += scored
            rec = np.empty(len(x), dtype=dtype)
            rec["id"], rec["code"] = ids, codes
            if refine:
                rec["vector"] = x16
            lists.append(assign)
            records.append(rec)
            if text:
                labels.add(table["label"], x, lambda g=g, kept=kept: _kept(parts.read_column(f, g, "text_embedding"),
                                                                          kept))
    assign = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    order = np.argsort(assign, kind="stable")  # by list; part row order kept within a list
    sizes = np.bincount(assign, minlength=ivf.nlist).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype("<i8")
    body = np.concatenate(records)[order] if records else np.zeros(0, dtype)
    storage.write_bytes(staging, offsets.tobytes() + body.tobytes(), ref.storage_options)
    names, vectors, sums, counts = labels.arrays()
    return PartAdded(part.name, len(assign), sizes, exact.scores, exact.ids, names, vectors, sums, counts, coarse,
                     read)


def _kept(column: pa.ChunkedArray, kept: pa.Array | None) -> pa.ChunkedArray:
    """A row group's column less the rows its curation drops."""
    return column if kept is None else column.filter(kept)


def staging_url(ref: BankRef, index_id: str, part: str, folder: str = "") -> str:
    """URL of a part's staging object (laid out by list; see the module docstring), under `folder` of the index
    folder (a delta's) when given."""
    name = index_layout.staging_object(part)
    return index_layout.index_url(ref, index_id, f"{folder}/{name}" if folder else name)


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
    coarse_score_mean: float = 0.0  # mean inner product of the vectors with their list's centroid

    @property
    def vectors(self) -> int:
        """Vectors added in all."""
        return sum(self.rows.values())


def add_parts(ref: BankRef, index_id: str, parts_: list[PartEntry], trained: bytes, nlist: int, exact: TopK,
              refine: bool, text: bool, folder: str = "", curation: dict[str, str] | None = None) -> AddResult:
    """Run one add task per part; merge what they report as they finish. Staging objects go under `folder`
    of the index folder (a delta's) when given.

    exact: an empty TopK of the autotune queries (with floors); each task fills a copy, merged here.
    curation: part name → its curation object, for the curated parts (their kept rows only are added)."""
    task = ray.remote(num_cpus=1, max_retries=2)(add_part)  # a retry rewrites the same staging object
    trained_ref, exact_ref = ray.put(trained), ray.put(exact)
    curation = curation or {}
    pending = {task.remote(ref, p, trained_ref, staging_url(ref, index_id, p.name, folder), exact_ref, refine,
                           text, curation.get(p.name)): p for p in parts_}
    sizes = np.zeros(nlist, np.int64)
    rows, by_part, coarse = {}, {}, 0.0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        part = pending.pop(done[0])
        added: PartAdded = ray.get(done[0])
        if added.read != part.rows:
            raise IndexCorruptError(f"part {part.name} has {added.read} rows but the manifest says {part.rows}; "
                                    "the part changed after it was committed")
        sizes += added.list_sizes
        exact.merge(added.exact_scores, added.exact_ids)
        rows[part.name] = added.rows
        by_part[part.ordinal] = added
        coarse += added.coarse_sum
    labels: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for ordinal in sorted(by_part):
        added = by_part[ordinal]
        for i, name in enumerate(added.labels):
            labels.setdefault(name, added.text[i])
            sums[name] = sums.get(name, 0.0) + added.visual_sums[i]
            counts[name] = counts.get(name, 0) + int(added.counts[i])
    mean = coarse / max(sum(rows.values()), 1)
    return AddResult(sizes, rows, exact.scores, exact.ids, labels, sums, counts, mean)
