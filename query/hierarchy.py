"""A region hierarchy: a query image's regions merged greedily, adjacent pair by adjacent pair, by the cosine of
their pooled features, and cut at several cosine thresholds.

A small region pooled on its own is a weak embedding (a few feature cells); the larger regions it belongs to
carry more of its object. Scoring a region by the mean of its scores at every level of the hierarchy (see
`query.segment.Segmenter`) keeps the small regions' boundaries and borrows the large regions' evidence.

Merging is exact pooling: a region's pooled feature is the normalised sum of its cells' features weighted by
their coverage (`bank_builder.embed`), and coverage is additive, so the pooled feature of a union is the
normalised sum of its members' unnormalised sums. Greedy merging does not depend on where it stops: the cut at
threshold t is the partition the merges reach when the best adjacent cosine first drops to t or below, so
one pass gives every level.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True, eq=False)
class RegionLevel:
    """One cut of the hierarchy. group: (n,) int64, the level's region (0..m-1) holding each base region;
    embeddings: (m, C) float32 L2-normalised pooled features of the level's regions."""

    group: np.ndarray
    embeddings: np.ndarray


def adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    """(E, 2) int64 unique pairs (a < b) of region numbers that touch (4-neighbourhood) in an (H, W) int map."""
    a = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
    b = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
    differ = a != b
    pairs = np.sort(np.stack([a[differ], b[differ]], axis=1), axis=1).astype(np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else np.zeros((0, 2), np.int64)


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """The thresholds as a strictly descending tuple of cosines in [-1, 1); ValueError naming the fix."""
    values = tuple(float(t) for t in thresholds)
    if any(not -1 <= t < 1 for t in values) or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"merge thresholds must be strictly descending cosines in [-1, 1), e.g. (0.8, 0.6, 0.4, "
                         f"0.2); got {values}")
    return values


def merge_levels(sums: np.ndarray, pairs: np.ndarray, thresholds: Sequence[float]) -> list[RegionLevel]:
    """The hierarchy's cuts, one per threshold (strictly descending cosines).

    sums: (n, C) float64, each base region's coverage-weighted sum of cell features (unnormalised); pairs: (E, 2)
    adjacent base regions (`adjacent_pairs`). Repeatedly the adjacent pair of current regions with the highest
    cosine is merged (ties: lowest region numbers first); level i is the partition when that cosine is ≤
    thresholds[i]."""
    thresholds = check_thresholds(thresholds)
    n = len(sums)
    total = np.array(sums, dtype=np.float64, copy=True)
    owner = np.arange(n)  # base region → its current region (the lowest base number in it)
    neighbours: list[set[int]] = [set() for _ in range(n)]
    for a, b in pairs.tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)
    version = np.zeros(n, np.int64)  # bumped on every merge, so stale heap entries are skipped
    heap: list[tuple[float, int, int, int, int]] = []

    def push(a: int, others: Sequence[int]) -> None:
        if not others:
            return
        cosines = _unit(total[list(others)]) @ _unit(total[a][None])[0]
        for b, c in zip(others, cosines.tolist()):
            lo, hi = min(a, b), max(a, b)
            heapq.heappush(heap, (-c, lo, hi, int(version[lo]), int(version[hi])))

    for a in range(n):
        push(a, sorted(b for b in neighbours[a] if b > a))
    levels = []
    for threshold in thresholds:
        while heap and -heap[0][0] > threshold:
            _, a, b, va, vb = heapq.heappop(heap)
            if version[a] != va or version[b] != vb:
                continue  # one of them changed since this pair was scored
            total[a] += total[b]
            owner[owner == b] = a
            version[a] += 1
            version[b] = -1  # b is gone: every entry naming it is stale
            for c in neighbours[b]:
                neighbours[c].discard(b)
                if c != a:
                    neighbours[c].add(a)
            neighbours[a] = (neighbours[a] | neighbours[b]) - {a, b}
            neighbours[b] = set()
            push(a, sorted(neighbours[a]))
        alive, group = np.unique(owner, return_inverse=True)
        levels.append(RegionLevel(group=group.astype(np.int64), embeddings=_unit(total[alive]).astype(np.float32)))
    return levels


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)
