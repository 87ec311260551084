"""Searching a sliced index: coarse-assign (after the OPQ rotation, if any), route each probed list to the
slice that owns it, run `search_preassigned` per slice on the trained IVF whose inverted lists hold only that
slice's lists, and merge the per-slice top-k by code score (ties by id). With refine, every candidate also
carries its exact inner product with the slice's stored float16 vector, and the merged best k·refine_factor
are re-ranked by it — faiss IndexRefineFlat's semantics, without a second pass over the slices.

Slices come through a loader (a callable slice number → SliceArrays), so a caller can put a cache, a local
disk copy or a prefetcher in front of storage. `SlicedIndex` keeps loaded slices in a small LRU. Searches on
one SlicedIndex are serialised around the per-slice swap of the IVF's inverted lists; each faiss call is
itself multi-threaded over the queries.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from bank_builder import manifest
from bank_builder.index import layout
from bank_builder.index.params import apply_chain, split_index
from bank_builder.index.slices import SliceArrays
from bank_builder.index.train import deserialize

SliceLoader = Callable[[int], SliceArrays]
QUERY_BLOCK = 1024  # queries searched together; bounds the candidate arrays to block · k · refine_factor


def storage_loader(bank: str, index: dict, storage_options: dict[str, Any] | None = None,
                   verify: bool = True) -> SliceLoader:
    """A loader that reads slice n of the manifest `index` entry from storage, checking its sha256."""

    def load(n: int) -> SliceArrays:
        return SliceArrays.from_bytes(layout.read_object(bank, index["id"], index["slices"][n], storage_options, verify))

    return load


def check_range(n: int, arrays: SliceArrays, expected: tuple[int, int]) -> None:
    """Raise IndexCorruptError unless slice n's arrays hold exactly the lists the slice table gives it."""
    if (arrays.lo, arrays.hi) != tuple(expected) or len(arrays.offsets) != arrays.hi - arrays.lo + 1:
        raise layout.IndexCorruptError(f"slice {n} holds lists {arrays.lo}..{arrays.hi}, expected {tuple(expected)}")


def fill_lists(invlists: faiss.ArrayInvertedLists, arrays: SliceArrays, labels: np.ndarray) -> None:
    """Append slice `arrays`' codes to their lists in `invlists`, labelled by `labels` (one int64 per row)."""
    labels, codes = np.ascontiguousarray(labels, dtype=np.int64), np.ascontiguousarray(arrays.codes)
    for j in np.flatnonzero(np.diff(arrays.offsets)):
        start, end = int(arrays.offsets[j]), int(arrays.offsets[j + 1])
        invlists.add_entries(arrays.lo + int(j), end - start, faiss.swig_ptr(labels[start:end]),
                             faiss.swig_ptr(codes[start:end]))


def probe(chain: list, ivf: faiss.IndexIVF, x: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(transformed queries, coarse scores (nq, nprobe), probed lists (nq, nprobe)) of queries x (nq, C)."""
    xt = np.ascontiguousarray(apply_chain(chain, x), dtype=np.float32)
    scores, lists = ivf.quantizer.search(xt, min(nprobe, ivf.nlist))
    return xt, scores, lists


class _Resident:
    """A loaded slice: ids (and vectors) as numpy, codes inside a faiss ArrayInvertedLists over all nlist lists."""

    def __init__(self, arrays: SliceArrays, nlist: int, code_size: int) -> None:
        self.lo, self.offsets, self.ids, self.vectors = arrays.lo, arrays.offsets, arrays.ids, arrays.vectors
        self.invlists = faiss.ArrayInvertedLists(nlist, code_size)
        fill_lists(self.invlists, arrays, arrays.ids)

    def rows(self, pairs: np.ndarray) -> np.ndarray:
        """Slice rows of faiss store_pairs results (list << 32 | offset); -1 stays -1."""
        valid = pairs >= 0
        lists = np.where(valid, pairs >> 32, self.lo)
        return np.where(valid, self.offsets[lists - self.lo] + (pairs & 0xFFFFFFFF), -1)


class SlicedIndex:
    """Top-k inner-product search over a sliced IVF index.

    trained: the trained, empty index (faiss, as stored in trained.faissindex).
    ranges: the list range [lo, hi) of each slice, in slice order, covering 0..nlist.
    loader: slice number → SliceArrays. nprobe, refine_factor: defaults of `search` (refine_factor 0 = off).
    max_resident: most slices kept loaded (None = all that were used).
    """

    def __init__(self, trained: faiss.Index, ranges: list[tuple[int, int]], loader: SliceLoader, nprobe: int = 1,
                 refine_factor: int = 0, max_resident: int | None = None) -> None:
        self.index = trained
        self.chain, self.ivf = split_index(trained)
        # Under the default parallel_mode 0, search_preassigned runs on one thread (IndexIVF.search parallelises
        # above it, over query blocks); mode 3 splits the queries over OpenMP threads inside it, same results.
        self.ivf.parallel_mode = 3
        self.dim, self.nlist = trained.d, self.ivf.nlist
        bounds = [lo for lo, _ in ranges] + [ranges[-1][1] if ranges else 0]
        if bounds[0] != 0 or bounds[-1] != self.nlist or any(lo >= hi for lo, hi in ranges) or any(
                ranges[i][1] != ranges[i + 1][0] for i in range(len(ranges) - 1)):
            raise layout.IndexCorruptError(f"slice ranges {ranges} do not tile lists 0..{self.nlist}")
        self.ranges, self.starts = list(ranges), np.array(bounds[:-1], np.int64)
        self.loader, self.nprobe, self.refine_factor, self.max_resident = loader, nprobe, refine_factor, max_resident
        self._resident: OrderedDict[int, _Resident] = OrderedDict()
        self._lock = threading.RLock()  # the IVF's inverted lists are swapped per slice search
        self._empty = faiss.ArrayInvertedLists(self.nlist, self.ivf.code_size)
        self.ivf.replace_invlists(self._empty, False)

    def probe(self, x: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(transformed queries, coarse scores (nq, nprobe), probed lists (nq, nprobe)) of queries x (nq, C)."""
        return probe(self.chain, self.ivf, x, nprobe)

    def slices_for(self, lists: np.ndarray) -> np.ndarray:
        """Slice number of each list number (-1 stays -1)."""
        return np.where(lists >= 0, np.searchsorted(self.starts, lists, side="right") - 1, -1)

    def load(self, n: int) -> _Resident:
        """Slice n through the loader, checked against the slice table (not cached: see `slice`)."""
        arrays = self.loader(n)
        check_range(n, arrays, self.ranges[n])
        return _Resident(arrays, self.nlist, self.ivf.code_size)

    def slice(self, n: int) -> _Resident:
        """Slice n, loaded on first use and kept in the LRU (at most max_resident slices)."""
        with self._lock:
            if n in self._resident:
                self._resident.move_to_end(n)
                return self._resident[n]
        res = self.load(n)
        with self._lock:
            self._resident[n] = res
            while self.max_resident is not None and len(self._resident) > self.max_resident:
                self._resident.popitem(last=False)
        return res

    def search(self, x: np.ndarray, k: int, nprobe: int | None = None,
               refine_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (nq, k) float32 inner products, best first; segment ids (nq, k) int64, -1 where fewer than
        k found) for queries x (nq, C) float32, L2-normalised. Ties are ordered by id.

        refine_factor > 0: the best k·refine_factor candidates by code score are re-ranked by exact inner
        product with the stored float16 vectors (and the scores returned are those exact products)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}) float32, got shape {x.shape}")
        nprobe = self.nprobe if nprobe is None else nprobe
        refine = self.refine_factor if refine_factor is None else refine_factor
        out = [self._search_block(x[i:i + QUERY_BLOCK], k, nprobe, refine) for i in range(0, len(x), QUERY_BLOCK)]
        if not out:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    def _search_block(self, x: np.ndarray, k: int, nprobe: int, refine: int) -> tuple[np.ndarray, np.ndarray]:
        xt, coarse, lists = self.probe(x, nprobe)
        owner = self.slices_for(lists)
        kk = k * refine if refine > 0 else k
        merged = Candidates.empty(len(x), kk, refine > 0)
        for n in np.unique(owner[owner >= 0]):
            found = self.slice_candidates(self.slice(int(n)), int(n), x, xt, lists, coarse, owner, kk, refine > 0)
            merged = merged.merge(found, kk)
        return merged.result(k)

    def slice_candidates(self, res: _Resident, n: int, x: np.ndarray, xt: np.ndarray, lists: np.ndarray,
                         coarse: np.ndarray, owner: np.ndarray, k: int, refine: bool) -> Candidates:
        """The top-k of slice n (resident as `res`) for every query, over the probed lists it owns; with
        refine, their exact inner products too. Queries probing none of its lists get no candidates."""
        if refine and res.vectors is None:
            raise ValueError("refine_factor > 0 needs an index built with IndexConfig(refine=True)")
        out = Candidates.empty(len(x), k, refine)
        q = np.flatnonzero((owner == n).any(axis=1))
        if len(q) == 0:
            return out
        mine = np.ascontiguousarray(np.where(owner[q] == n, lists[q], -1))
        scores, pairs = self._search_slice(res, np.ascontiguousarray(xt[q]), mine, coarse[q], k)
        rows = res.rows(pairs)
        ids = np.full(rows.shape, -1, np.int64)
        ids[rows >= 0] = res.ids[rows[rows >= 0]]
        out.scores[q], out.ids[q] = scores, ids
        if refine:
            qq, cc = np.nonzero(rows >= 0)
            exact = np.full(rows.shape, -np.inf, np.float32)
            exact[qq, cc] = np.einsum("nd,nd->n", x[q][qq], res.vectors[rows[qq, cc]].astype(np.float32))
            out.exact[q] = exact
        return out

    def _search_slice(self, res: _Resident, xt: np.ndarray, lists: np.ndarray, coarse: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
        """search_preassigned on the lists of one slice; returns (scores, store_pairs (list << 32 | offset))."""
        n = len(xt)
        scores, pairs = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        lists, coarse = np.ascontiguousarray(lists, np.int64), np.ascontiguousarray(coarse, np.float32)
        with self._lock:
            self.ivf.replace_invlists(res.invlists, False)
            try:
                self.ivf.nprobe = lists.shape[1]
                self.ivf.search_preassigned_c(n, faiss.swig_ptr(xt), k, faiss.swig_ptr(lists), faiss.swig_ptr(coarse),
                                              faiss.swig_ptr(scores), faiss.swig_ptr(pairs), True)
            finally:
                self.ivf.replace_invlists(self._empty, False)
        return scores, pairs


@dataclass
class Candidates:
    """Per-query candidates (nq, m): code scores, segment ids (-1 = none) and, with refine, exact scores."""

    scores: np.ndarray
    ids: np.ndarray
    exact: np.ndarray | None = None

    @classmethod
    def empty(cls, nq: int, m: int, refine: bool) -> Candidates:
        none = np.full((nq, m), -np.inf, np.float32)
        return cls(none, np.full((nq, m), -1, np.int64), none.copy() if refine else None)

    def merge(self, other: Candidates, k: int) -> Candidates:
        """The k best of both by code score (descending), ties by id: what one index scanning both would keep.

        Both hold k columns per query. Only the queries `other` found something for are re-ranked: a slice
        serves a fraction of the queries, and the rest keep their candidates as they are."""
        hit = np.flatnonzero(other.ids[:, 0] >= 0)  # faiss puts found results first, -1 after
        mine, theirs = self.columns(), other.columns()
        top = _top([np.concatenate([a[hit], b[hit]], axis=1) for a, b in zip(mine, theirs)], k)
        out = [c.copy() for c in mine]
        for c, t in zip(out, top):
            c[hit] = t
        return Candidates(*out)

    def columns(self) -> list[np.ndarray]:
        """scores, ids and (with refine) exact scores, in that order."""
        return [self.scores, self.ids] + ([] if self.exact is None else [self.exact])

    def result(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the best k: by code score, or re-ranked by exact score when refined."""
        if self.exact is None:
            return self.scores[:, :k], self.ids[:, :k]
        exact, ids = _top([self.exact, self.ids], k)
        return exact, ids


def _top(columns: list[np.ndarray], k: int) -> list[np.ndarray]:
    """The k best per row of (scores, ids, ...) by score descending, then id ascending; all columns reordered."""
    scores, ids = columns[0], columns[1]
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return [np.take_along_axis(c, order, axis=1) for c in columns]


def open_index(bank: str, version: str | None = None, storage_options: dict[str, Any] | None = None,
               loader: SliceLoader | None = None, max_resident: int | None = None,
               verify: bool = True) -> SlicedIndex:
    """The sliced index of a bank version (default CURRENT), with its tuned nprobe and refine factor.

    loader: how slices are fetched (default: `storage_loader`, reading from the bank with checksums)."""
    entry = index_entry(bank, version, storage_options)
    trained = deserialize(layout.read_object(bank, entry["id"], entry["trained"], storage_options, verify))
    return SlicedIndex(trained, [tuple(s["lists"]) for s in entry["slices"]],
                       loader or storage_loader(bank, entry, storage_options, verify), nprobe=entry["nprobe"],
                       refine_factor=entry["refine_factor"], max_resident=max_resident)


def index_entry(bank: str, version: str | None = None, storage_options: dict[str, Any] | None = None) -> dict:
    """The manifest's `index` field of a bank version; raises with the fix when there is none."""
    m = manifest.read_manifest(bank, version, storage_options)
    if m is None:
        raise manifest.BankMismatchError(f"{bank} has no published version; build it first (`refbank build`)")
    if not m.get("index"):
        raise manifest.BankMismatchError(f"bank {bank} version {m['version']} has no index; "
                                         "run `refbank index` (bank_builder.index.build_index) first")
    return m["index"]
