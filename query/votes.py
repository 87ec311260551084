"""kNN votes: each region's nearest bank segments vote for their labels, weighted by softmax(cosine /
temperature); the open-set mode, the foreground mode's default scorer and reference calibration use them."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from query.interfaces import BACKGROUND_LABELS, Searcher, SegmentMetadata


def knn_votes(searcher: Searcher, metadata: SegmentMetadata, vectors: np.ndarray, k: int,
              temperature: float) -> tuple[list[str | None], np.ndarray]:
    """(n, C) float32 → (candidate labels U, None = unlabelled; shares (n, U) float32 rows summing to 1, or 0 with
    no neighbour): each of the k nearest segments votes softmax(cosine / temperature) for its label."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be ≥ 1 and temperature > 0, got k={k}, temperature={temperature}")
    scores, ids = searcher.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
    valid = ids >= 0
    labels = metadata.labels(ids.ravel())
    candidates = sorted(set(labels) - {None}) + [None]
    column = {label: j for j, label in enumerate(candidates)}
    index = np.array([column[label] for label in labels], dtype=np.int64).reshape(ids.shape)
    logits = np.where(valid, scores.astype(np.float64) / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    weights = np.where(valid, np.exp(logits - np.where(np.isfinite(top), top, 0)), 0.0)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
    shares = np.zeros((len(ids), len(candidates)), dtype=np.float64)
    np.add.at(shares, (np.repeat(np.arange(len(ids)), ids.shape[1]), index.ravel()), weights.ravel())
    return candidates, shares.astype(np.float32)


# How open-set mode treats neighbours without a label (unpaired segments of a caption-paired bank): "ignore"
# leaves their votes out of the winner, "vote" lets them win (the region is then background).
Unlabelled = Literal["ignore", "vote"]


def check_unlabelled(value: str, option: str) -> None:
    """ValueError naming `option` and the rules when `value` is not an Unlabelled rule."""
    if value not in get_args(Unlabelled):
        raise ValueError(f"{option}={value!r}: use one of {', '.join(get_args(Unlabelled))}")


def labelled_votes(candidates: list[str | None], shares: np.ndarray, unlabelled: Unlabelled) -> np.ndarray:
    """The (n, U) shares of `knn_votes` (last candidate None) as they are under "vote"; under "ignore" the
    unlabelled column is 0, or 1 in the rows without any labelled vote (so only those take None); the labels'
    shares keep their values (fractions of all votes, not renormalised)."""
    if unlabelled == "vote":
        return shares
    out = np.array(shares, dtype=np.float32, copy=True)
    out[:, -1] = out[:, :-1].sum(axis=1) == 0
    return out


class KnnForegroundScorer:
    """Foreground score = kNN vote share (softmax(cosine / temperature) weights) of neighbours whose label is
    foreground, among labelled neighbours; 0 when none is labelled."""

    def __init__(self, searcher: Searcher, metadata: SegmentMetadata, foreground_labels: frozenset[str] | None = None,
                 background_labels: frozenset[str] = BACKGROUND_LABELS, k: int = 10, temperature: float = 0.05):
        self.searcher, self.metadata, self.k, self.temperature = searcher, metadata, k, temperature
        self.foreground_labels, self.background_labels = foreground_labels, frozenset(background_labels)

    def is_foreground(self, label: str) -> bool:
        """Whether a bank label counts as foreground."""
        if self.foreground_labels is not None:
            return label in self.foreground_labels
        return label not in self.background_labels

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, C) float32 L2-normalised → (n,) float32 in [0, 1]."""
        if not len(embeddings):
            return np.zeros(0, np.float32)
        candidates, shares = knn_votes(self.searcher, self.metadata, embeddings, self.k, self.temperature)
        labelled = shares[:, :-1]  # the last candidate is None
        fg = np.array([self.is_foreground(c) for c in candidates[:-1]], dtype=bool)
        total = labelled.sum(axis=1)
        fraction = labelled[:, fg].sum(axis=1) / np.where(total > 0, total, 1)
        return np.clip(np.where(total > 0, fraction, 0.0), 0.0, 1.0).astype(np.float32)
