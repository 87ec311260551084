"""kNN over a bank's sliced index: coarse quantizer → probed lists → only the slices that own them → top-k.

The trained quantizer is loaded once and stays resident; slices are fetched through a `SliceCache` on first
use. Two ways to hold them, picked by whether the cache's memory budget holds the whole index:
  whole    `ResidentIndex`: every slice, once touched, lives in one faiss IVF; a warm query is one faiss pass,
           as fast as a monolithic index (nothing is ever evicted, so the budget must hold it all);
  paged    `SlicedIndex` over the cache: slices are searched one by one and the top-k merged, so a budget
           smaller than the index holds (least recently used slices are evicted).
Both return what one monolithic faiss index with the same trained quantizer, codes and nprobe returns.
"""

from __future__ import annotations

import numbers
from typing import Any

import faiss
import numpy as np

from bank_builder.index.search import SlicedIndex
from bank_builder.index.train import deserialize
from bank_builder.manifest import BankMismatchError
from query.bank import Bank
from query.resident import ResidentIndex, resident_bytes
from query.slices import SliceCache

MAX_K = 1024
NORM_TOLERANCE = 1e-2  # |‖x‖ - 1| allowed: vectors that went through float16 drift by ~1e-3
SQUARED_NORM_RANGE = ((1 - NORM_TOLERANCE) ** 2, (1 + NORM_TOLERANCE) ** 2)


class _CachedIndex(SlicedIndex):
    """A SlicedIndex whose resident slices live in a SliceCache: one LRU and one byte budget, not two."""

    def __init__(self, trained: faiss.Index, index: dict, cache: SliceCache) -> None:
        super().__init__(trained, [tuple(s["lists"]) for s in index["slices"]], cache.arrays,
                         nprobe=index["nprobe"], refine_factor=index["refine_factor"], max_resident=0)
        self.cache = cache

    def slice(self, n: int) -> Any:
        """Slice n, search-ready, from the cache (loaded and checked by `SlicedIndex.load` on a miss)."""
        return self.cache.get(n, self.prepare)

    def prepare(self, n: int) -> tuple[Any, int]:
        """(slice n search-ready, the bytes it holds): faiss's copy of ids and codes, plus the numpy ids,
        offsets and refine vectors kept beside it."""
        res = self.load(n)
        vectors = 0 if res.vectors is None else res.vectors.nbytes
        return res, len(res.ids) * (self.ivf.code_size + 8) + res.ids.nbytes + res.offsets.nbytes + vectors


class BankSearcher:
    """Top-k inner-product search of a bank's visual embeddings (thread-safe; slices load lazily).

    bank: an opened bank with an index; cache: this searcher's own SliceCache for that bank version. The
    cache's memory budget picks the mode (see the module docstring): `mode` is "whole" or "paged"."""

    def __init__(self, bank: Bank, cache: SliceCache, max_k: int = MAX_K) -> None:
        if not bank.index:
            raise BankMismatchError(f"bank {bank.uri} version {bank.version} has no index; run `refbank index`")
        if cache.index["id"] != bank.index["id"]:
            raise ValueError(f"the SliceCache holds index {cache.index['id']}, the bank's is {bank.index['id']}; "
                             "make the cache from the same opened bank")
        self.bank, self.cache, self.max_k = bank, cache, max_k
        entry = bank.index
        trained = deserialize(cache.read(entry["trained"]))
        self.dim, self.nlist = trained.d, faiss.extract_index_ivf(trained).nlist
        self.nprobe, self.refine_factor = int(entry["nprobe"]), int(entry["refine_factor"])
        whole = resident_bytes(int(entry["vectors"]), int(entry["code_size"]), self.dim, bool(entry.get("refine")))
        if whole <= cache.memory_bytes:
            self.mode, self.index = "whole", ResidentIndex(trained, entry, self._fetch, cache.note_hit)
        else:
            self.mode, self.index = "paged", _CachedIndex(trained, entry, cache)

    def search(self, vectors: np.ndarray, k: int, nprobe: int | None = None,
               refine_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n, k) float32 inner products, best first; segment ids (n, k) int64; id -1 and score -inf
        where fewer than k were found) for queries (n, C) float32, L2-normalised. nprobe, refine_factor: None =
        the bank's tuned values; nprobe is capped at the list count. Invalid input raises ValueError saying what
        to fix."""
        x = self._check_vectors(vectors)
        _check_int("k", k, 1, self.max_k)
        if nprobe is not None:
            _check_int("nprobe", nprobe, 1, None)
        if refine_factor is not None:
            _check_int("refine_factor", refine_factor, 0, None)
        scores, ids = self.index.search(x, int(k), self.nprobe if nprobe is None else int(nprobe),
                                        self.refine_factor if refine_factor is None else int(refine_factor))
        # A row's results come best first, so a row with missing results ends in id -1; faiss leaves its lowest
        # float (-3.4e38) there when nothing is re-ranked. (Python's `in` on a short list beats a numpy reduction.)
        if -1 in ids[:, -1].tolist():
            scores[ids < 0] = -np.inf
        return scores, ids

    def _fetch(self, n: int) -> None:
        """Install slice n in the whole-index mode, once, through the cache (single fetch, counters)."""
        self.cache.get(n, self._install)

    def _install(self, n: int) -> tuple[int, int]:
        return n, self.index.install(n, self.cache.arrays(n))

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
