"""kNN over a bank's index: coarse quantizer → probed lists → the list cache makes them resident → one faiss
search over them → (refine) exact re-ranking on the stored float16 vectors → segment ids.

The trained quantizer and the list directory are read once at open and stay resident; lists come and go in
the cache (query.lists). Results equal one monolithic faiss index (IVF + refine on float16 vectors) holding
the same vectors with the same quantizer, codes and nprobe, whatever the memory budget (tested).
"""

from __future__ import annotations

import numbers
from typing import Any

import faiss
import numpy as np

from bank_builder.format import BankMismatchError
from bank_builder.format.trained import apply_chain, read_trained, split_index
from query.bank import Bank
from query.disk_cache import DiskCache
from query.lists import BudgetTooSmall, CacheConfig, ListCache

MAX_K = 1024
NORM_TOLERANCE = 1e-2  # |‖x‖ - 1| allowed: vectors that went through float16 drift by ~1e-3
SQUARED_NORM_RANGE = ((1 - NORM_TOLERANCE) ** 2, (1 + NORM_TOLERANCE) ** 2)


class BankSearcher:
    """Top-k inner-product search of a bank's visual embeddings (thread-safe; lists load lazily).

    bank: an opened bank with an index; cache: the list cache's options (memory budget, eviction policy); disk: a
    local disk tier for lists (shared by the searchers of one process)."""

    def __init__(self, bank: Bank, cache: CacheConfig = CacheConfig(), max_k: int = MAX_K,
                 disk: DiskCache | None = None) -> None:
        entry = bank.index
        if entry is None:
            raise BankMismatchError(f"bank {bank.uri} version {bank.version} has no index; run `refbank index`")
        self.bank, self.max_k, self.entry = bank, max_k, entry
        self.trained = read_trained(bank.ref, entry)
        self.chain, self.ivf = split_index(self.trained)
        # Under the default parallel_mode 0, search_preassigned runs on one thread (IndexIVF.search parallelises
        # above it, over query blocks); mode 3 splits the queries over OpenMP threads inside it, same results.
        self.ivf.parallel_mode = 3
        self.dim, self.nlist = self.trained.d, self.ivf.nlist
        self.nprobe, self.refine_factor = entry.nprobe, entry.refine_factor
        self.cache = ListCache(bank.ref, entry, self.ivf, cache, disk, bank.removed)
        self.refined = None
        if self.cache.store is not None:  # a cache that never evicts: re-rank inside faiss (IndexRefine)
            self.trained.ntotal = self.ivf.ntotal = self.cache.store.ntotal  # IndexRefine checks both hold the rows
            self.refined = faiss.IndexRefine(self.trained, self.cache.store)
        self._params: dict[tuple[int, int], tuple] = {}

    def search(self, vectors: np.ndarray, k: int, nprobe: int | None = None,
               refine_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n, k) float32 inner products, best first; segment ids (n, k) int64; id -1 and score -inf
        where fewer than k were found) for queries (n, C) float32, L2-normalised. nprobe, refine_factor: None =
        the bank's tuned values; nprobe is capped at the list count. Invalid input raises ValueError saying what
        to fix; BudgetTooSmall when one query's lists do not fit the cache's memory budget."""
        x = self._check_vectors(vectors)
        _check_int("k", k, 1, self.max_k)
        if nprobe is not None:
            _check_int("nprobe", nprobe, 1, None)
        if refine_factor is not None:
            _check_int("refine_factor", refine_factor, 0, None)
        refine = self.refine_factor if refine_factor is None else int(refine_factor)
        if refine and not self.entry.refine:
            raise ValueError("refine_factor > 0 needs an index built with refine vectors (IndexConfig(refine=True))")
        nprobe = min(self.nprobe if nprobe is None else int(nprobe), self.nlist)
        if self.refined is not None or (self.cache.never_evicts and not refine):
            scores, ids = self._search_whole(x, int(k), nprobe, refine)
        else:
            xt = x if not self.chain else np.ascontiguousarray(apply_chain(self.chain, x), dtype=np.float32)
            coarse, lists = self._probe(xt, nprobe)
            scores, ids = self._search(x, xt, coarse, lists, int(k), refine)
        # A row's results come best first, so a row with missing results ends in id -1; faiss leaves its lowest
        # float (-3.4e38) there when nothing is re-ranked. (Python's `in` on a short list beats a numpy reduction.)
        if -1 in ids[:, -1].tolist():
            scores[ids < 0] = -np.inf
        return scores, ids

    def _probe(self, xt: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """(coarse scores, probed lists), each (n, nprobe), of transformed queries xt."""
        n = len(xt)
        coarse, lists = np.empty((n, nprobe), np.float32), np.empty((n, nprobe), np.int64)
        self.ivf.quantizer.search_c(n, faiss.swig_ptr(xt), nprobe, faiss.swig_ptr(coarse), faiss.swig_ptr(lists))
        return coarse, lists

    def _search_whole(self, x: np.ndarray, k: int, nprobe: int, refine: int) -> tuple[np.ndarray, np.ndarray]:
        """Search with a cache that never evicts: one faiss call (IVF, or IndexRefine over its fp16 store) once
        every list is resident; until then the probed lists are made resident first."""
        if not self.cache.complete:
            xt = x if not self.chain else np.ascontiguousarray(apply_chain(self.chain, x), dtype=np.float32)
            with self.cache.pinned(self._probe(xt, nprobe)[1]):
                pass  # resident from here on: a cache that never evicts keeps them
        else:
            self.cache.count_hits(len(x) * nprobe)
        n = len(x)
        scores, rows = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        index = self.refined if refine else self.trained
        index.search_c(n, faiss.swig_ptr(x), k, faiss.swig_ptr(scores), faiss.swig_ptr(rows),
                       self._params_for(nprobe, refine))
        return scores, self.cache.row_ids.take(rows)

    def _params_for(self, nprobe: int, refine: int) -> faiss.SearchParameters:
        """Search parameters per (nprobe, refine factor), made once (setdefault is atomic: racing threads use
        the same pair). The IVF parameters must outlive the refine wrapper pointing at them: both are kept."""
        made = self._params.get((nprobe, refine))
        if made is None:
            ivf = faiss.SearchParametersIVF(nprobe=nprobe)
            params = ivf
            if refine:
                params = faiss.IndexRefineSearchParameters()
                params.k_factor, params.base_index_params = float(refine), ivf
            made = self._params.setdefault((nprobe, refine), (params, ivf))
        return made[0]

    def _search(self, x: np.ndarray, xt: np.ndarray, coarse: np.ndarray, lists: np.ndarray, k: int,
                refine: int) -> tuple[np.ndarray, np.ndarray]:
        """Search queries whose probed lists are known; a batch whose lists exceed the budget is split."""
        n = len(x)
        if n > 1 and not self.cache.never_evicts and \
                self.cache.charge[np.unique(lists[lists >= 0])].sum() > self.cache.config.memory_bytes:
            half = n // 2
            top = self._search(x[:half], xt[:half], coarse[:half], lists[:half], k, refine)
            bottom = self._search(x[half:], xt[half:], coarse[half:], lists[half:], k, refine)
            return np.concatenate([top[0], bottom[0]]), np.concatenate([top[1], bottom[1]])
        kk = k * refine if refine else k
        scores, rows = np.empty((n, kk), np.float32), np.empty((n, kk), np.int64)
        with self.cache.pinned(lists):
            self.ivf.search_preassigned_c(n, faiss.swig_ptr(xt), kk, faiss.swig_ptr(lists), faiss.swig_ptr(coarse),
                                          faiss.swig_ptr(scores), faiss.swig_ptr(rows), False,
                                          self._params_for(lists.shape[1], 0))
            if refine:
                scores, rows = self._refine(x, rows, k)
            return scores, self.cache.row_ids.take(rows)

    def _refine(self, x: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best k of each row's candidates by exact inner product with their stored float16 vectors (what
        faiss IndexRefine does); rows -1 stay last."""
        if len(x) == 1 and rows[0, -1] >= 0:  # one query with every candidate found: the common case, short
            exact = self.cache.vectors[rows[0]].astype(np.float32) @ x[0]
            top = np.argsort(-exact, kind="stable")[:k]
            return exact[top][None], rows[0][top][None]
        valid = rows >= 0
        candidates = self.cache.vectors[np.where(valid, rows, 0)].astype(np.float32)
        exact = np.einsum("nkd,nd->nk", candidates, x)
        exact[~valid] = -np.inf
        top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, top, axis=1), np.take_along_axis(rows, top, axis=1)

    def stats(self) -> dict[str, int | float]:
        """The list cache's counters and gauges (see ListCache.stats)."""
        return self.cache.stats()

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}) float32 (one row per query), got shape {x.shape}")
        if x.dtype.kind != "f":
            raise ValueError(f"queries must be float32, got {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        # A warm batch-1 search costs ~60 µs in all and a numpy reduction ~2 µs, so the hot path is one faiss
        # norm pass and a Python range test (NaN and inf fail it too); detailed errors are made only on failure.
        squared = np.empty(len(x), np.float32)
        faiss.fvec_norms_L2sqr(faiss.swig_ptr(squared), faiss.swig_ptr(x), self.dim, len(x))
        low, high = SQUARED_NORM_RANGE
        if all(low <= v <= high for v in squared.tolist()):
            return x
        ok = (squared >= low) & (squared <= high)
        if not np.isfinite(x).all():
            rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise ValueError(f"queries hold NaN or inf (rows {rows[:10].tolist()})")
        off = np.flatnonzero(~ok)
        norms = np.sqrt(squared[off[:10]])
        raise ValueError(f"queries must be L2-normalised (rows {off[:10].tolist()} have norms "
                         f"{np.round(norms, 4).tolist()}); divide each by its norm first")


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    """Raise ValueError unless `value` is an integer in [low, high] (high None: no upper bound)."""
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


__all__ = ["MAX_K", "BankSearcher", "BudgetTooSmall", "CacheConfig"]
