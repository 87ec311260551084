"""The autotune's evaluator: search the built index one list object at a time, so memory stays at one object
whatever the bank size. Coarse-assign (after the OPQ rotation, if any), route each probed list to the object
holding it, run `search_preassigned` on the trained IVF holding only that object's lists, and merge the
per-object top-k by code score (ties by id). With refine, every candidate also carries its exact inner product
with its stored float16 vector, and the merged best k·refine_factor are re-ranked by it — faiss IndexRefine's
semantics. Results equal one monolithic faiss index with the same quantizer and codes (tested).

The query service does not use this: it holds lists in one cache (query.lists) and searches them in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from bank_builder.format import BankRef, ObjectEntry, index_layout
from bank_builder.format.index_layout import ListLayout
from bank_builder.format.trained import apply_chain, split_index


def probe(chain: list, ivf: faiss.IndexIVF, x: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(transformed queries, coarse scores (nq, nprobe), probed lists (nq, nprobe)) of queries x (nq, C)."""
    xt = np.ascontiguousarray(apply_chain(chain, x), dtype=np.float32)
    scores, lists = ivf.quantizer.search(xt, min(nprobe, ivf.nlist))
    return xt, scores, lists


class _Loaded:
    """One loaded list object: ids (and vectors) as numpy in list order, codes in a faiss ArrayInvertedLists."""

    def __init__(self, data: bytes, lo: int, hi: int, directory: np.ndarray, layout: ListLayout, nlist: int) -> None:
        rows = directory[lo:hi]
        self.lo, self.offsets = lo, np.concatenate([[0], np.cumsum(rows["count"])]).astype(np.int64)
        self.invlists = faiss.ArrayInvertedLists(nlist, layout.code_size)
        ids, vectors = [], []
        view = memoryview(data)
        for j, row in enumerate(rows):
            if not row["count"]:
                continue
            arrays = layout.decode(view[int(row["offset"]):int(row["offset"] + row["bytes"])], int(row["count"]))
            labels = np.arange(self.offsets[j], self.offsets[j + 1], dtype=np.int64)
            codes = np.ascontiguousarray(arrays.codes)  # named: faiss reads through the pointer during the call
            self.invlists.add_entries(lo + j, len(labels), faiss.swig_ptr(labels), faiss.swig_ptr(codes))
            ids.append(arrays.ids)
            vectors.append(arrays.vectors)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.vectors = np.concatenate(vectors) if layout.refine and vectors else None

    def rows(self, pairs: np.ndarray) -> np.ndarray:
        """Object rows of faiss store_pairs results (list << 32 | offset); -1 stays -1."""
        valid = pairs >= 0
        lists = np.where(valid, pairs >> 32, self.lo)
        return np.where(valid, self.offsets[lists - self.lo] + (pairs & 0xFFFFFFFF), -1)


class ObjectScan:
    """Searches of a built index, object by object (see the module docstring). Not thread-safe."""

    def __init__(self, trained: faiss.Index, ref: BankRef, index_id: str, objects: list[ObjectEntry],
                 layout: ListLayout, directory: np.ndarray) -> None:
        self.index, self.ref, self.index_id, self.objects, self.directory = trained, ref, index_id, objects, directory
        self.chain, self.ivf = split_index(trained)
        # Under the default parallel_mode 0, search_preassigned runs on one thread (IndexIVF.search parallelises
        # above it, over query blocks); mode 3 splits the queries over OpenMP threads inside it, same results.
        self.ivf.parallel_mode = 3
        self.nlist, self.layout = self.ivf.nlist, layout
        self.owner = directory["object"].astype(np.int64)
        self._empty = faiss.ArrayInvertedLists(self.nlist, self.ivf.code_size)
        self.ivf.replace_invlists(self._empty, False)

    def probe(self, x: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(transformed queries, coarse scores (nq, nprobe), probed lists (nq, nprobe)) of queries x (nq, C)."""
        return probe(self.chain, self.ivf, x, nprobe)

    def objects_for(self, lists: np.ndarray) -> np.ndarray:
        """Object number of each list number (-1 stays -1)."""
        return np.where(lists >= 0, self.owner[np.maximum(lists, 0)], -1)

    def load(self, n: int) -> _Loaded:
        """List object n, read and checked against its sha256."""
        data = index_layout.read_object(self.ref, self.index_id, self.objects[n])
        lists = np.flatnonzero(self.owner == n)
        return _Loaded(data, int(lists[0]), int(lists[-1]) + 1, self.directory, self.layout, self.nlist)

    def candidates(self, res: _Loaded, n: int, x: np.ndarray, xt: np.ndarray, lists: np.ndarray,
                   coarse: np.ndarray, owner: np.ndarray, k: int, refine: bool) -> Candidates:
        """The top-k of object n (loaded as `res`) for every query, over the probed lists it holds; with refine,
        their exact inner products too. Queries probing none of its lists get no candidates."""
        out = Candidates.empty(len(x), k, refine)
        q = np.flatnonzero((owner == n).any(axis=1))
        if len(q) == 0:
            return out
        mine = np.ascontiguousarray(np.where(owner[q] == n, lists[q], -1))
        scores, pairs = self._search_object(res, np.ascontiguousarray(xt[q]), mine, coarse[q], k)
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

    def _search_object(self, res: _Loaded, xt: np.ndarray, lists: np.ndarray, coarse: np.ndarray,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
        """search_preassigned on the lists of one object; returns (scores, store_pairs (list << 32 | offset))."""
        n = len(xt)
        scores, pairs = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        lists, coarse = np.ascontiguousarray(lists, np.int64), np.ascontiguousarray(coarse, np.float32)
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
        """No candidate for any query."""
        none = np.full((nq, m), -np.inf, np.float32)
        return cls(none, np.full((nq, m), -1, np.int64), none.copy() if refine else None)

    def merge(self, other: Candidates, k: int) -> Candidates:
        """The k best of both by code score (descending), ties by id: what one index scanning both would keep.

        Both hold k columns per query. Only the queries `other` found something for are re-ranked: an object
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
