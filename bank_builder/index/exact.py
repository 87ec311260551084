"""Exact top-k by inner product of a fixed set of queries over vectors streamed in blocks: the autotune's
ground truth, gathered by the add tasks while they hold each row group anyway.

Each block costs one BLAS product plus a threshold test against every query's current k-th best score. A
floor per query (its k-th best over the training sample, which every part's task gets) prunes from the
first block on, so few scores pass the test and the product is nearly the whole cost. (faiss.knn +
ResultHeap cost twice as much here: every score goes through a per-query heap.)
"""

from __future__ import annotations

import numpy as np

BLOCK = 1024  # vectors per product: the (queries, BLOCK) float32 score block stays in cache
# Slack under a floor: the same dot product summed in another BLAS blocking order may differ in its last bits.
FLOOR_MARGIN = 1e-4


class TopK:
    """Running top-k of queries (nq, C) float32: scores (nq, k) best first, ids (nq, k), -1 = none yet.

    floor: (nq,) float32, a score each query's k-th best over *all* vectors streamed anywhere is known to
    reach (see `floors`); vectors scoring below it are skipped. A part then keeps fewer than k candidates
    for a query when fewer of its vectors reach the floor; merging the parts still gives the exact top-k."""

    def __init__(self, queries: np.ndarray, k: int, floor: np.ndarray | None = None) -> None:
        self.queries = np.ascontiguousarray(queries, np.float32)
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)
        self.floor = np.full(len(queries), -np.inf, np.float32) if floor is None else np.asarray(floor, np.float32)

    def fresh(self) -> TopK:
        """An empty TopK of the same queries, k and floors, with writable arrays (a Ray argument's are not)."""
        return TopK(self.queries, self.scores.shape[1], self.floor)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Take vectors x (n, C) float32 with their ids (n,) int64."""
        for start in range(0, len(x), BLOCK):
            scores, block = self.queries @ x[start:start + BLOCK].T, ids[start:start + BLOCK]
            threshold = np.maximum(self.scores[:, -1], self.floor)
            if np.isneginf(threshold).any():  # a query with no floor and fewer than k results takes the block's best
                self.merge(scores, np.broadcast_to(block, scores.shape))
                continue
            # flatnonzero on the raveled mask: 2-D np.nonzero costs more than the product itself.
            hits = np.flatnonzero(scores >= threshold[:, None])
            if len(hits):
                q, j = np.divmod(hits, scores.shape[1])
                self._merge_few(q, scores[q, j], block[j])

    def merge(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Fold per-query candidates, scores and ids (nq, m) (id -1 = none), into the top-k."""
        k = self.scores.shape[1]
        s = np.concatenate([self.scores, np.where(ids >= 0, scores, -np.inf)], axis=1)
        i = np.concatenate([self.ids, ids], axis=1)
        if s.shape[1] > k:  # cut to the k best first: a full sort of a block per query is the cost avoided
            best = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, i = np.take_along_axis(s, best, axis=1), np.take_along_axis(i, best, axis=1)
        order = np.lexsort((i, -s), axis=1)
        self.scores, self.ids = np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)

    def _merge_few(self, q: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
        """Fold a few candidates (query row, score, id) into the full top-k of their rows."""
        k = self.scores.shape[1]
        rows = np.unique(q)
        all_q = np.concatenate([np.repeat(rows, k), q])
        all_s = np.concatenate([self.scores[rows].ravel(), scores])
        all_i = np.concatenate([self.ids[rows].ravel(), ids])
        order = np.lexsort((all_i, -all_s, all_q))
        take = order[(np.searchsorted(all_q[order], rows)[:, None] + np.arange(k)).ravel()]
        self.scores[rows], self.ids[rows] = all_s[take].reshape(-1, k), all_i[take].reshape(-1, k)


def floors(queries: np.ndarray, sample: np.ndarray, k: int) -> np.ndarray:
    """(nq,) float32: each query's k-th best score over `sample` (n, C) float32, less a rounding margin.

    The sample is a subset of the vectors the exact top-k runs over, so the k-th best over all of them is at
    least this; -inf where the sample has fewer than k vectors."""
    top = TopK(queries, k)
    top.add(np.ascontiguousarray(sample, np.float32), np.arange(len(sample), dtype=np.int64))
    kth = top.scores[:, -1]
    return (kth - FLOOR_MARGIN * np.maximum(1.0, np.abs(kth))).astype(np.float32)
