"""Index choice: IVF parameters from the bank size and a memory target (as autofaiss does), or a factory string.

Every index is an IVF variant under inner product on L2-normalised vectors (METRIC_INNER_PRODUCT):
IVF-Flat, IVF-SQ8, IVF-PQ, or any of them behind a vector transform (OPQ+IVF-PQ = IndexPreTransform).
The list objects only need an IndexIVF with array inverted lists, so all of them store and search alike.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import faiss

from bank_builder.format.trained import split_index

ID_BYTES = 8  # a stored segment id (int64) per vector
MIN_POINTS_PER_LIST = 39  # faiss k-means wants at least this many training points per centroid


@dataclass(frozen=True)
class IndexConfig:
    """Options of `build_index`; the defaults suit a laptop-sized bank and scale with it.

    factory: a faiss index_factory string (IVF variants only, e.g. "IVF4096,PQ32", "OPQ16_64,IVF1024,PQ16",
      "IVF256,Flat") that replaces the automatic choice. The metric is always inner product.
    memory_target_bytes_per_vector: resident bytes per vector of the searchable index, id (8 bytes)
      included; picks the code: Flat (4·d) if it fits, else SQ8 (d), else PQ with the largest m dividing d.
      Refine vectors (2·d bytes, float16) are stored with the lists on top of this.
    opq: rotate with OPQ before IVF-PQ (automatic choice only).
    flat_below: banks with fewer vectors get an exact IVF-Flat index (compressing them saves nothing).
    train_sample: most vectors sampled for training; nlist is capped so that 39·nlist of them exist.
    max_nlist: upper clamp of the number of inverted lists.
    kmeans_iters: k-means iterations for the coarse quantizer.
    use_gpu: train the k-means on GPU; None = when faiss sees a GPU.
    nprobe_candidates: nprobe values the autotune measures (clipped to nlist).
    target_recall: the autotune picks the smallest nprobe whose recall@k reaches this.
    k: the k of recall@k.
    autotune_queries: held-out bank vectors used as autotune queries (never in the training sample).
    refine: store float16 vectors with the lists and re-rank k·refine_factor candidates exactly.
    refine_factor: candidates re-ranked per result when refine is on.
    object_bytes: target size of one list object (an object holding one huge list may exceed it); readers
      fetch single lists by byte range, so this only bounds the builder's memory and the object count.
    seed: sampling and k-means seed; the same bank and config give the same trained index.
    """

    factory: str | None = None
    memory_target_bytes_per_vector: int = 72
    opq: bool = False
    flat_below: int = 10_000
    train_sample: int = 200_000
    max_nlist: int = 1 << 18
    kmeans_iters: int = 20
    use_gpu: bool | None = None
    nprobe_candidates: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    target_recall: float = 0.95
    k: int = 10
    autotune_queries: int = 500
    refine: bool = True
    refine_factor: int = 4
    object_bytes: int = 64 << 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.memory_target_bytes_per_vector <= ID_BYTES:
            raise ValueError(f"memory_target_bytes_per_vector must exceed the {ID_BYTES}-byte id; "
                             f"got {self.memory_target_bytes_per_vector}")
        if self.refine and self.refine_factor < 1:
            raise ValueError(f"refine_factor must be >= 1, got {self.refine_factor}")
        for name in ("object_bytes", "train_sample", "k", "autotune_queries", "max_nlist", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.nprobe_candidates or min(self.nprobe_candidates) < 1:
            raise ValueError(f"nprobe_candidates must be positive integers, got {self.nprobe_candidates}")


@dataclass(frozen=True)
class IndexParams:
    """The resolved choice: factory string, list count, code size, and how many vectors train / tune it."""

    factory: str
    kind: str  # "ivf-flat", "ivf-sq8", "ivf-pq", "opq+ivf-pq", or "custom" for a user factory
    dim: int
    nlist: int
    code_size: int  # bytes per stored code (ids excluded)
    n_train: int
    n_queries: int

    @property
    def bytes_per_vector(self) -> int:
        """Resident bytes per vector of the searchable index: id + code."""
        return ID_BYTES + self.code_size


def sample_sizes(n: int, config: IndexConfig) -> tuple[int, int]:
    """(training vectors, autotune queries) for a bank of n vectors; queries are held out of training."""
    if n < 2:
        raise ValueError(f"a bank needs at least 2 vectors to index, this one has {n}")
    n_queries = min(config.autotune_queries, max(1, n // 10))
    return min(config.train_sample, n - n_queries), n_queries


def choose_nlist(n: int, n_train: int, max_nlist: int) -> int:
    """≈ 4·sqrt(n) rounded to a power of two, clamped to [1, max_nlist] and to n_train // 39 lists."""
    nlist = 1 << max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    return max(1, min(nlist, max_nlist, n_train // MIN_POINTS_PER_LIST))


def choose_code(dim: int, memory_target: int) -> tuple[str, str]:
    """(factory suffix, kind) of the richest code that fits `memory_target` bytes per vector (id included)."""
    budget = memory_target - ID_BYTES
    if budget >= 4 * dim:
        return "Flat", "ivf-flat"
    if budget >= dim:
        return "SQ8", "ivf-sq8"
    m = max(m for m in range(1, min(budget, dim) + 1) if dim % m == 0)
    return f"PQ{m}", "ivf-pq"


def choose_params(n: int, dim: int, config: IndexConfig) -> IndexParams:
    """The index for a bank of n vectors of dimension dim under `config` (validated by building it once)."""
    n_train, n_queries = sample_sizes(n, config)
    if config.factory is not None:
        index = make_index(config.factory, dim)
        ivf = faiss.extract_index_ivf(index)  # a view into `index`: keep `index` referenced while reading it
        return IndexParams(config.factory, "custom", dim, ivf.nlist, ivf.code_size, n_train, n_queries)
    nlist = choose_nlist(n, n_train, config.max_nlist)
    if n < config.flat_below:
        code, kind = "Flat", "ivf-flat"
    else:
        code, kind = choose_code(dim, config.memory_target_bytes_per_vector)
    factory = f"IVF{nlist},{code}"
    if kind == "ivf-pq" and config.opq:
        m = int(code[2:])
        factory, kind = f"OPQ{m}_{dim},{factory}", "opq+ivf-pq"
    index = make_index(factory, dim)
    return IndexParams(factory, kind, dim, nlist, faiss.extract_index_ivf(index).code_size, n_train, n_queries)


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index for `factory`; raises with the fix when refbank cannot store its lists."""
    if re.search(r"(^|,)(RFlat|Refine)", factory):
        raise ValueError(f"factory {factory!r} has a refine stage; drop it and use IndexConfig(refine=True), "
                         "which re-ranks with the float16 vectors stored with the lists")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"faiss cannot build {factory!r} for dimension {dim}: {exc}") from exc
    _, inner = split_index(index)
    if not isinstance(inner, faiss.IndexIVF):
        raise ValueError(f"factory {factory!r} is not an IVF index (optionally behind a transform such as OPQ); "
                         "refbank stores inverted lists one by one. Use e.g. 'IVF1024,PQ32', 'OPQ16_64,IVF1024,PQ16' "
                         "or 'IVF1,Flat' for exact search")
    if not isinstance(faiss.downcast_InvertedLists(inner.invlists), faiss.ArrayInvertedLists):
        raise ValueError(f"factory {factory!r} packs its lists in blocks (fast-scan); use the plain variant, "
                         "e.g. 'IVF1024,PQ32' instead of 'IVF1024,PQ32x4fs'")
    return index
