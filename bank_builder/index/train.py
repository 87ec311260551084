"""Train once: sample vectors from the parts (Ray task per part, row groups only), k-means the coarse
quantizer (on GPU where faiss sees one), number its lists for locality, train the code (PQ / SQ / OPQ) on the
residuals, serialise."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import ray

from bank_builder.format import BankRef, PartEntry, parts as part_io
from bank_builder.format.curation import keep_mask
from bank_builder.format.trained import split_index
from bank_builder.index.params import MIN_POINTS_PER_LIST, IndexConfig, IndexParams, make_index

log = logging.getLogger("refbank.index")

LOCALITY_LEAF = 16  # lists ordered by bisection down to groups this small


@dataclass
class Sample:
    """Training vectors and held-out autotune queries, float32 (n, C), as stored (L2-normalised float16)."""

    train: np.ndarray
    queries: np.ndarray
    query_ids: np.ndarray  # (n_queries,) int64 segment ids of the query vectors


def plan_sample(parts: list[PartEntry], n_train: int, n_queries: int, seed: int,
                oversample: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per part name: (sorted training rows, sorted query rows), disjoint, drawn without replacement.

    Rows are drawn uniformly from a random set of row groups holding `oversample` times the rows needed, so
    a sample of a huge bank reads ~oversample·(n_train + n_queries) rows instead of touching every row group."""
    rows = np.array([p.rows for p in parts], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(rows)])
    group_starts = np.concatenate([np.arange(s, s + r, part_io.ROW_GROUP_SIZE) for s, r in zip(starts, rows)])
    group_ends = np.minimum(group_starts + part_io.ROW_GROUP_SIZE, np.repeat(starts[1:], -(-rows // part_io.ROW_GROUP_SIZE)))
    rng = np.random.default_rng(seed)
    need = n_train + n_queries
    order = rng.permutation(len(group_starts))
    take = int(np.searchsorted(np.cumsum(group_ends[order] - group_starts[order]), oversample * need)) + 1
    chosen_groups = np.sort(order[:take])
    pool = np.concatenate([np.arange(a, b) for a, b in zip(group_starts[chosen_groups], group_ends[chosen_groups])])
    chosen = pool[rng.choice(len(pool), need, replace=False)]
    plan = {}
    for i, p in enumerate(parts):
        def local(g: np.ndarray) -> np.ndarray:
            return np.sort(g[(g >= starts[i]) & (g < starts[i + 1])] - starts[i])

        plan[p.name] = (local(chosen[n_queries:]), local(chosen[:n_queries]))
    return plan


def read_kept_rows(ref: BankRef, part: PartEntry, rows: np.ndarray,
                   curation: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(visual embeddings of the sorted `rows` that the part's curation keeps, those rows); every row of an
    uncurated part (curation None)."""
    keep = keep_mask(ref, curation, part.rows)
    rows = rows if keep is None else rows[keep[rows]]
    return (part_io.read_rows(ref, part.name, rows) if len(rows) else np.zeros((0, 0), np.float16)), rows


def sample_vectors(ref: BankRef, parts: list[PartEntry], params: IndexParams, seed: int,
                   curation: dict[str, str] | None = None, kept: int | None = None) -> Sample:
    """Read the planned rows of every part in parallel (one Ray task per part that has some).

    curation: part name → its curation object; only rows it keeps are sampled (the index holds only those, and
    the exact top-k's floors come from the sample). kept: the rows kept in all; the plan draws that much more,
    so that the kept rows fill the sample."""
    n_train, n_queries = params.n_train, params.n_queries
    total = sum(p.rows for p in parts)
    if curation and kept:  # draw in proportion, then cut the kept draws down to the sizes wanted
        scale = total / kept
        n_train, n_queries = min(int(n_train * scale) + 1, total), int(n_queries * scale) + 1
        n_train = max(0, min(n_train, total - n_queries))
    plan = plan_sample(parts, n_train, n_queries, seed)
    read = ray.remote(num_cpus=1, max_retries=2)(read_kept_rows)
    refs = {}
    for p in parts:
        train_rows, query_rows = plan[p.name]
        if len(train_rows) + len(query_rows):
            refs[p.name] = read.remote(ref, p, np.union1d(train_rows, query_rows), (curation or {}).get(p.name))
    train, queries, ids = [], [], []
    for p in parts:
        if p.name not in refs:
            continue
        train_rows, query_rows = plan[p.name]
        x, both = ray.get(refs.pop(p.name))
        if not len(both):
            continue  # its curation drops every row drawn
        train_rows, query_rows = np.intersect1d(train_rows, both), np.intersect1d(query_rows, both)
        train.append(x[np.searchsorted(both, train_rows)])
        queries.append(x[np.searchsorted(both, query_rows)])
        ids.append(np.array([part_io.segment_id(p.ordinal, int(r)) for r in query_rows], np.int64))
    rng = np.random.default_rng(seed)
    sample = Sample(train=np.concatenate(train).astype(np.float32),
                    queries=np.concatenate(queries).astype(np.float32),
                    query_ids=np.concatenate(ids).astype(np.int64))
    return _cut(sample, params.n_train, params.n_queries, rng) if curation else sample


def _cut(sample: Sample, n_train: int, n_queries: int, rng: np.random.Generator) -> Sample:
    """At most n_train training and n_queries query vectors of `sample`, drawn at random in sample order."""
    train = np.sort(rng.choice(len(sample.train), min(n_train, len(sample.train)), replace=False))
    queries = np.sort(rng.choice(len(sample.queries), min(n_queries, len(sample.queries)), replace=False))
    return Sample(sample.train[train], sample.queries[queries], sample.query_ids[queries])


def use_gpu(requested: bool | None) -> bool:
    """Whether to run k-means on GPU: `requested`, or (None) whether faiss sees a GPU."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if requested and gpus == 0:
        raise ValueError("IndexConfig(use_gpu=True) but faiss sees no GPU (is faiss-cpu installed?); install "
                         "faiss-gpu on a GPU machine, or leave use_gpu=None to use a GPU only when there is one")
    return gpus > 0 if requested is None else bool(requested)


def train_index(params: IndexParams, x: np.ndarray, config: IndexConfig) -> tuple[faiss.Index, bool]:
    """(the trained empty index, whether k-means ran on GPU) for training vectors x (n, C) float32."""
    if len(x) < params.nlist:
        raise ValueError(f"{params.factory!r} has {params.nlist} lists but only {len(x)} training vectors exist; "
                         f"use fewer lists (≤ {max(1, len(x) // MIN_POINTS_PER_LIST)}) or a bigger bank")
    if len(x) < MIN_POINTS_PER_LIST * params.nlist:
        log.warning("training %d lists on %d vectors (faiss advises ≥ %d)", params.nlist, len(x),
                    MIN_POINTS_PER_LIST * params.nlist)
    index = make_index(params.factory, params.dim)
    chain, ivf = split_index(index)
    for vt in chain:  # OPQ: learn the rotation first, then everything downstream sees rotated vectors
        vt.train(x)
        x = vt.apply(x)
    gpu = use_gpu(config.use_gpu)
    # Spherical k-means: centroids stay unit-norm, the right quantizer for inner product on normalised vectors.
    kmeans = faiss.Kmeans(ivf.d, params.nlist, niter=config.kmeans_iters, seed=config.seed, spherical=True,
                          gpu=gpu, min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(x))
    ivf.quantizer.add(kmeans.centroids[locality_order(kmeans.centroids)])
    _quiet_pq(ivf, len(x))
    ivf.train(x)  # the quantizer is trained (ntotal == nlist), so this trains only the code on residuals
    index.is_trained = True
    return index, gpu


def locality_order(centroids: np.ndarray, leaf: int = LOCALITY_LEAF) -> np.ndarray:
    """A permutation of the centroids that gives nearby centroids nearby list numbers.

    k-means numbers its centroids arbitrarily, and list objects hold contiguous list ranges: without this, a
    query's probed lists land far apart, and neighbouring lists cannot be fetched in one range. Recursive
    bisection at the median along each group's principal axis (a PCA tree) keeps neighbours together."""
    order = np.arange(len(centroids))
    pending = [(0, len(order))]
    while pending:
        lo, hi = pending.pop()
        if hi - lo <= leaf:
            continue
        centred = centroids[order[lo:hi]] - centroids[order[lo:hi]].mean(axis=0)
        axis = np.linalg.eigh(centred.T @ centred)[1][:, -1]  # eigenvalues ascend: the last is the principal axis
        order[lo:hi] = order[lo:hi][np.argsort(centred @ axis, kind="stable")]
        mid = (lo + hi) // 2
        pending += [(lo, mid), (mid, hi)]
    return order


def _quiet_pq(ivf: faiss.IndexIVF, n: int) -> None:
    """Skip polysemous training; warn once (not once per sub-quantizer, as faiss does) on few training points."""
    pq = getattr(ivf, "pq", None)
    if pq is None:
        return
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False  # only serves polysemous_ht filtering, which refbank does not use; slow
    if n < MIN_POINTS_PER_LIST * pq.ksub:
        log.warning("PQ trains %d centroids per sub-quantizer on %d vectors (faiss advises ≥ %d); codes may be "
                    "coarse — raise train_sample or use a smaller index", pq.ksub, n, MIN_POINTS_PER_LIST * pq.ksub)
    pq.cp.min_points_per_centroid = 1
