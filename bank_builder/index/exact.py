"""Exact top-k by inner product of a fixed set of queries over vectors streamed in blocks: the autotune's
ground truth, gathered by the add tasks while they hold each row group anyway.

Each block costs one BLAS product plus a threshold test against every query's current k-th best score; once
the first block has filled the top-k, few scores pass the test, so the product is nearly the whole cost.
(faiss.knn + ResultHeap cost twice as much here: every score goes through a per-query heap.)
"""

from __future__ import annotations

import numpy as np

BLOCK = 1024  # vectors per product: the (queries, BLOCK) float32 score block stays in cache


class TopK:
    """Running top-k of queries (nq, C) float32: scores (nq, k) best first, ids (nq, k), -1 = none yet."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = np.ascontiguousarray(queries, np.float32)
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Take vectors x (n, C) float32 with their ids (n,) int64."""
        for start in range(0, len(x), BLOCK):
            scores, block = self.queries @ x[start:start + BLOCK].T, ids[start:start + BLOCK]
            if (self.ids[:, -1] < 0).any():  # some query has fewer than k results: it takes the block's best
                self.merge(scores, np.broadcast_to(block, scores.shape))
                continue
            q, j = np.nonzero(scores > self.scores[:, -1:])
            if len(q):
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
