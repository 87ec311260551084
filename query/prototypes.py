"""Vocabulary prototypes: class names → the bank labels nearest by text → visual prototypes to score regions by.

One prototype per class (the text-weighted mean of its labels' mean visual embeddings), one per matched label,
or P per class: the bank segments of the class's labels nearest to its mean prototype, clustered by spherical
k-means, so a class whose segments look several ways gets a prototype for each look.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from query.interfaces import LabelTable, Searcher, SegmentMetadata, SegmentVectors

KMEANS_ITERATIONS = 20


@dataclass(frozen=True)
class VocabularyConfig:
    """Vocabulary mode: each class takes its `labels_per_class` nearest bank labels by text cosine, weighted by
    softmax(cosine / text_temperature); combine "mean" = one prototype (weighted mean of their visual prototypes),
    "max" = one prototype per label (those with weight ≥ 0.1 × the best), region score = max cosine.
    prototypes_per_class P > 1: instead, the `prototype_neighbours` bank segments nearest to the class's mean
    prototype that carry one of its labels (weight ≥ 0.1 × the best) are clustered into P prototypes (spherical
    k-means; fewer segments than P: each is a prototype); needs the bank's segment vectors.
    background_threshold: regions whose best score is below it are background (0); None = every region labelled."""

    labels_per_class: int = 3
    text_temperature: float = 0.01
    combine: Literal["mean", "max"] = "mean"
    background_threshold: float | None = None
    prototypes_per_class: int = 1
    prototype_neighbours: int = 256

    def __post_init__(self) -> None:
        if self.labels_per_class < 1 or self.text_temperature <= 0:
            raise ValueError("labels_per_class must be ≥ 1 and text_temperature > 0")
        if self.combine not in ("mean", "max"):
            raise ValueError(f"combine={self.combine!r}: use 'mean' or 'max'")
        if self.prototypes_per_class < 1 or self.prototype_neighbours < 1:
            raise ValueError("prototypes_per_class and prototype_neighbours must be ≥ 1")


@dataclass(frozen=True, eq=False)
class BankAccess:
    """What P prototypes per class read from the bank: kNN, labels by id, stored vectors by id."""

    searcher: Searcher
    metadata: SegmentMetadata
    vectors: SegmentVectors | None


def class_prototypes(table: LabelTable, text: np.ndarray, names: list[str], config: VocabularyConfig,
                     bank: BankAccess | None = None) -> tuple[list[np.ndarray], dict[str, list[tuple[str, float]]]]:
    """Per class an (m, C) float32 L2-normalised prototype array, and {class: [(bank label, weight), ...]}.

    text: (K, D) float32 L2-normalised embeddings of the K class names; table: the bank's label table."""
    label_prototypes = np.asarray(table.prototypes, dtype=np.float32)
    prototypes, matched = [], {}
    for name, (top, weights) in zip(names, _text_matches(table, text, config)):
        rows = label_prototypes[top]
        mean = normalise((weights[:, None] * rows).sum(axis=0, keepdims=True)).astype(np.float32)
        strong = [table.labels[j] for j, w in zip(top, weights) if w >= 0.1 * weights.max()]
        if config.prototypes_per_class > 1:
            proto = _clustered(mean, set(strong), config, bank)
        elif config.combine == "mean":
            proto = mean
        else:
            proto = rows[weights >= 0.1 * weights.max()]
        prototypes.append(proto.astype(np.float32))
        matched[name] = [(table.labels[j], round(float(w), 6)) for j, w in zip(top, weights)]
    return prototypes, matched


def _text_matches(table: LabelTable, text: np.ndarray, config: VocabularyConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class (its `labels_per_class` nearest bank labels by text cosine as indices into table.labels, their
    softmax(cosine / text_temperature) weights), for (K, D) L2-normalised class text embeddings."""
    sims = text @ np.asarray(table.text, dtype=np.float32).T  # (K, L)
    k = min(config.labels_per_class, len(table.labels))
    tops = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    matches = []
    for c, top in enumerate(tops):
        logits = sims[c, top].astype(np.float64) / config.text_temperature
        weights = np.exp(logits - logits.max())
        matches.append((top, weights / weights.sum()))
    return matches


def class_labels(table: LabelTable, text: np.ndarray, names: list[str],
                 config: VocabularyConfig = VocabularyConfig()) -> dict[str, str]:
    """{bank label: class} for the labels vocabulary mode matches to a class by text (weight ≥ 0.1 × the class's
    best, as its prototypes use them); a label that is a class name is that class, a label matched by several the
    one where its weight is largest, a label matched by none is absent. text: (K, D) as for `class_prototypes`."""
    best: dict[str, tuple[float, str]] = {}
    for name, (top, weights) in zip(names, _text_matches(table, text, config)):
        for j, w in zip(top, weights):
            label = table.labels[j]
            if w >= 0.1 * weights.max() and w > best.get(label, (-1.0, ""))[0]:
                best[label] = (float(w), name)
    folded = {label: name for label, (_, name) in best.items()}
    known = set(table.labels)
    folded.update({name: name for name in names if name in known})
    return folded


def _clustered(mean: np.ndarray, labels: set[str], config: VocabularyConfig, bank: BankAccess | None) -> np.ndarray:
    """(≤ P, C) prototypes: spherical k-means of the class's nearest labelled segments (see VocabularyConfig)."""
    if bank is None or bank.vectors is None:
        raise ValueError("prototypes_per_class > 1 reads the bank's segment vectors: build the Segmenter with "
                         "vectors=<the opened Bank> (query.bank.Bank.visual_embeddings)")
    _, ids = bank.searcher.search(mean, config.prototype_neighbours)
    ids = ids[0][ids[0] >= 0]
    mine = np.array([label in labels for label in bank.metadata.labels(ids)], dtype=bool)
    if not mine.any():
        return mean  # none of its segments among the neighbours: keep the mean
    points = normalise(np.asarray(bank.vectors.visual_embeddings(ids[mine]), dtype=np.float64))
    return spherical_kmeans(points, config.prototypes_per_class).astype(np.float32)


def spherical_kmeans(points: np.ndarray, clusters: int, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """(min(P, n), C) L2-normalised centroids of (n, C) L2-normalised points under cosine, deterministic: seeded
    by farthest-point selection (the point nearest the mean, then each time the point least similar to those
    chosen), then Lloyd iterations; an emptied cluster keeps its centroid."""
    if len(points) <= clusters:
        return points.copy()
    chosen = [int(np.argmax(points @ normalise(points.mean(axis=0, keepdims=True))[0]))]
    nearest = points @ points[chosen[0]]
    while len(chosen) < clusters:
        chosen.append(int(np.argmin(nearest)))
        nearest = np.maximum(nearest, points @ points[chosen[-1]])
    centroids = points[chosen].copy()
    for _ in range(iterations):
        assign = np.argmax(points @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, points)
        filled = np.bincount(assign, minlength=clusters) > 0
        updated = np.where(filled[:, None], normalise(sums), centroids)
        if np.allclose(updated, centroids):
            break
        centroids = updated
    return centroids


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)
