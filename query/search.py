"""kNN over a bank's sliced index: coarse quantizer → probed lists → only the slices that own them → merged top-k.

The trained quantizer is loaded once and stays resident; slices come from a `SliceCache`, which holds them
search-ready (the faiss inverted lists already built), so a resident slice costs a query nothing to reuse.
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
from query.slices import SliceCache

MAX_K = 1024
NORM_TOLERANCE = 1e-2  # |‖x‖ - 1| allowed: vectors that went through float16 drift by ~1e-3


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

    bank: an opened bank with an index; cache: this searcher's own SliceCache for that bank version."""

    def __init__(self, bank: Bank, cache: SliceCache, max_k: int = MAX_K) -> None:
        if not bank.index:
            raise BankMismatchError(f"bank {bank.uri} version {bank.version} has no index; run `refbank index`")
        if cache.index["id"] != bank.index["id"]:
            raise ValueError(f"the SliceCache holds index {cache.index['id']}, the bank's is {bank.index['id']}; "
                             "make the cache from the same opened bank")
        self.bank, self.cache, self.max_k = bank, cache, max_k
        self.index = _CachedIndex(deserialize(cache.read(bank.index["trained"])), bank.index, cache)

    @property
    def dim(self) -> int:
        """Width C of the query vectors."""
        return self.index.dim

    @property
    def nprobe(self) -> int:
        """Lists probed per query by default (tuned at build time for the bank's target recall)."""
        return self.index.nprobe

    @property
    def refine_factor(self) -> int:
        """Candidates re-ranked exactly per result by default (0 = no re-ranking)."""
        return self.index.refine_factor

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
        scores, ids = self.index.search(x, int(k), None if nprobe is None else int(nprobe),
                                        None if refine_factor is None else int(refine_factor))
        scores[ids < 0] = -np.inf  # faiss leaves its lowest float (-3.4e38) there when nothing is re-ranked
        return scores, ids

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}) float32 (one row per query), got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"queries must be float32, got {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise ValueError(f"queries hold NaN or inf (rows {rows[:10].tolist()})")
        norms = np.linalg.norm(x, axis=1)
        off = np.flatnonzero(np.abs(norms - 1) > NORM_TOLERANCE)
        if len(off):
            raise ValueError(f"queries must be L2-normalised (rows {off[:10].tolist()} have norms "
                             f"{np.round(norms[off[:10]], 4).tolist()}); divide each by its norm first")
        return x


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    """Raise ValueError unless `value` is an integer in [low, high] (high None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
