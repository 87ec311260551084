"""A bank's whole index as one faiss IVF, filled slice by slice as queries first touch them.

When the memory budget holds the whole index, per-slice searching and merging in Python buys nothing: every
slice ends up resident. Here all slices share one `ArrayInvertedLists` over the nlist lists. A slice
installs its lists into it (and its float16 refine vectors into one store indexed by global row), and a
search is a single faiss call on an `IndexRefine` over that IVF and the refine store (or on the IVF alone).
So a warm query costs what a monolithic faiss index costs.

Global rows number the vectors slice by slice: slice n holds rows [start_n, start_n + vectors_n), in its own
row order. The inverted lists carry global rows as labels, and `row_ids` maps them to segment ids.

Threads: a slice's lists are written once, before their `loaded` flags are set, and never again. A search
only reads lists whose flags are set, so readers need no lock. Slices are never evicted: the caller picks
this index only when the whole index fits its budget.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from bank_builder.index import layout
from bank_builder.index.params import split_index
from bank_builder.index.search import check_range, fill_lists, probe
from bank_builder.index.slices import SliceArrays

SliceFetch = Callable[[int], None]  # slice number → returns once that slice is installed (caller single-flights)


def resident_bytes(vectors: int, code_size: int, dim: int, refine: bool) -> int:
    """Memory a ResidentIndex holds for `vectors` rows: code + row label + segment id (+ float16 vector)."""
    return vectors * (code_size + 16 + (2 * dim if refine else 0))


class ResidentIndex:
    """Top-k inner-product search over a sliced IVF index held whole in memory (thread-safe).

    trained: the trained, empty index. index: the manifest's `index` entry (slice table, nprobe, refine).
    fetch: installs slice n by calling `install` (a SliceCache puts its single-flight and counters there).
    hit: called once per search that needed no slice installed (the cache's hit counter)."""

    def __init__(self, trained: faiss.Index, index: dict, fetch: SliceFetch, hit: Callable[[], None]) -> None:
        self.chain, self.ivf = split_index(trained)
        self.trained, self.dim, self.nlist = trained, trained.d, self.ivf.nlist
        self.code_size = self.ivf.code_size
        self.refine = bool(index.get("refine"))
        ranges = [tuple(s["lists"]) for s in index["slices"]]
        counts = np.array([s["vectors"] for s in index["slices"]], np.int64)
        self.ranges, self.row_starts = ranges, np.concatenate([[0], np.cumsum(counts)])
        self.list_owner = np.empty(self.nlist, np.int64)
        for n, (lo, hi) in enumerate(ranges):
            self.list_owner[lo:hi] = n
        self.fetch, self.hit = fetch, hit
        self.loaded = np.zeros(self.nlist, bool)
        self.invlists = faiss.ArrayInvertedLists(self.nlist, self.code_size)
        self.ivf.replace_invlists(self.invlists, False)  # self.invlists keeps it alive
        # row → segment id, one extra -1 at the end: faiss's "none found" row -1 then maps to -1 by itself.
        self.row_ids = np.full(int(self.row_starts[-1]) + 1, -1, np.int64)
        total = len(self.row_ids) - 1
        self.store = None
        if self.refine:  # IndexRefine's refine index, holding the float16 vectors by global row
            self.store = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            self.store.codes.resize(total * self.store.code_size)
            self.store.ntotal = total
            self.vectors = faiss.rev_swig_ptr(self.store.codes.data(), self.store.codes.size()).view(
                np.float16).reshape(total, self.dim)
        self.trained.ntotal = self.ivf.ntotal = total  # IndexRefine checks both hold the same rows
        self.refined = None if self.store is None else faiss.IndexRefine(self.trained, self.store)
        self.complete = False  # every slice installed: searches skip the residency check
        self._params: dict[tuple[int, int], tuple] = {}

    def install(self, n: int, arrays: SliceArrays) -> int:
        """Put slice n's lists, segment ids and refine vectors in place; returns the bytes it holds."""
        check_range(n, arrays, self.ranges[n])
        start, end = int(self.row_starts[n]), int(self.row_starts[n + 1])
        if self.loaded[arrays.lo:arrays.hi].all():  # installed before (its cache entry was evicted): adding
            return resident_bytes(end - start, self.code_size, self.dim, self.refine)  # again would duplicate
        if len(arrays) != end - start or (self.refine and arrays.vectors is None):
            raise layout.IndexCorruptError(f"slice {n} holds {len(arrays)} vectors, the slice table says "
                                           f"{end - start}{' with refine vectors' if self.refine else ''}")
        self.row_ids[start:end] = arrays.ids
        if self.refine:
            self.vectors[start:end] = arrays.vectors
        fill_lists(self.invlists, arrays, np.arange(start, end, dtype=np.int64))
        self.loaded[arrays.lo:arrays.hi] = True  # last: from here on searches may read these lists
        self.complete = bool(self.loaded.all())
        return resident_bytes(end - start, self.code_size, self.dim, self.refine)

    def search(self, x: np.ndarray, k: int, nprobe: int, refine_factor: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (nq, k) float32, segment ids (nq, k) int64; -1 where fewer than k were found) for
        L2-normalised queries x (nq, C) float32 (checked by the caller). refine_factor > 0 re-ranks the best
        k·refine_factor candidates by exact inner product with the stored float16 vectors."""
        if refine_factor and self.refined is None:
            raise ValueError("refine_factor > 0 needs an index built with IndexConfig(refine=True)")
        if self.complete or not self._install_probed(x, nprobe):
            self.hit()
        index = self.refined if refine_factor else self.trained
        n = len(x)
        scores, rows = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        index.search_c(n, faiss.swig_ptr(x), k, faiss.swig_ptr(scores), faiss.swig_ptr(rows),
                       self._search_params(nprobe, refine_factor))
        return scores, self.row_ids.take(rows)

    def probe(self, x: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(transformed queries, coarse scores (nq, nprobe), probed lists (nq, nprobe)) of queries x (nq, C)."""
        return probe(self.chain, self.ivf, x, nprobe)

    def _install_probed(self, x: np.ndarray, nprobe: int) -> int:
        """Install every slice owning a list that queries x probe; returns how many were missing (the search
        then assigns the queries again: the quantizer costs twice until every slice is in, once after)."""
        _, _, lists = self.probe(x, nprobe)
        missing = np.unique(self.list_owner[lists[~self.loaded[lists]]])
        for s in missing:
            self.fetch(int(s))
        return len(missing)

    def _search_params(self, nprobe: int, refine_factor: int) -> faiss.SearchParameters:
        """Search parameters per (nprobe, refine_factor), made once: the indexes' own fields are shared.
        nprobe is capped at the list count here, off the per-query path."""
        key = (nprobe, refine_factor)
        made = self._params.get(key)
        if made is None:
            ivf = faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist))
            params = ivf
            if refine_factor:
                params = faiss.IndexRefineSearchParameters()
                params.k_factor, params.base_index_params = float(refine_factor), ivf
            # setdefault is atomic: racing threads all use the first pair stored. The IVF params must outlive
            # the wrapper that points at them, so both are kept.
            made = self._params.setdefault(key, (params, ivf))
        return made[0]
