"""Visual-reference mode's parts: its options, a reference's prototype (own bank labels, recruited label
prototypes, calibrated threshold) and the decision per region and per class ("exists" or "no target").

`query.segment.Segmenter.prepare_references` and `Segmenter.reference` call these; everything here works on
embeddings and the bank's read interfaces (query.interfaces), never on images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from query.interfaces import LabelTable, Searcher, SegmentMetadata
from query.votes import knn_votes

ReferenceDecision = Literal["margin", "calibrated"]
REFERENCE_DECISIONS: tuple[str, ...] = ("margin", "calibrated")


@dataclass(frozen=True)
class ReferenceConfig:
    """Reference mode (see `Segmenter.prepare_references` and `Segmenter.reference`).

    The reference's own bank labels are those with a kNN vote share (softmax(cosine / temperature)) ≥
    positive_share among its `k` nearest segments. recruit: weight of those labels' mean bank prototype in the
    reference's prototype (0 = the reference alone). margin is in units of the bank's class separation
    (`class_separation`: 1 − the mean cosine between two of its label prototypes), so one value means the same
    across encoders whose embeddings spread differently. pool_shots: references sharing a label make one prototype
    (the normalised mean of their embeddings), else one prototype each (a class then matches through its best
    prototype). decision: how "exists" is decided (`decide`): "margin"
    (default) = the best region's relative score (cosine to the prototype − cosine to the nearest other bank
    label) is ≥ margin; "calibrated" = some region clears the prototype's calibrated threshold and has a relative
    score > 0. fpr: fraction of bank segments of other labels allowed above the calibrated threshold; at most
    max_calibration_k neighbours are fetched for it. scribble_width: pixels (None = max(3, min(H, W) // 32)).
    decision, margin, recruit and pool_shots were chosen on a generated corpus of seed 73 (docs/QUALITY.md,
    "Reference mode").
    """

    fpr: float = 0.01
    k: int = 10
    temperature: float = 0.05
    positive_share: float = 0.2
    max_calibration_k: int = 1024  # query.search.MAX_K
    scribble_width: int | None = None
    decision: ReferenceDecision = "margin"
    margin: float = 0.1
    recruit: float = 0.5
    pool_shots: bool = True

    def __post_init__(self) -> None:
        if self.decision not in REFERENCE_DECISIONS:
            raise ValueError(f"reference decision {self.decision!r}: use one of {', '.join(REFERENCE_DECISIONS)}")
        if not 0 < self.fpr < 1:
            raise ValueError(f"fpr must lie in (0, 1), got {self.fpr}")
        if not 0 <= self.recruit < 1:
            raise ValueError(f"recruit must lie in [0, 1) (0 = the reference alone), got {self.recruit}")
        if not -2 <= self.margin <= 2:
            raise ValueError(f"margin is a difference of cosines and must lie in [-2, 2], got {self.margin}")


@dataclass(eq=False)
class ReferencePrototype:
    """A reference's prototype (C,) float32 L2-normalised (its pooled embedding, blended with its own labels'
    bank prototypes when recruiting), its calibrated cosine threshold, and the bank labels it is nearest to
    (the ones excluded from its negatives)."""

    label: str
    vector: np.ndarray
    threshold: float
    bank_labels: list[str]


def make_prototype(label: str, pooled: np.ndarray, searcher: Searcher, metadata: SegmentMetadata,
                   table: LabelTable, config: ReferenceConfig) -> ReferencePrototype:
    """A reference's prototype from its pooled (C,) embedding: own labels (kNN vote of the pooled embedding),
    recruitment (`recruit`), then the threshold calibrated for the final vector (`calibrate`)."""
    own = own_labels(pooled, searcher, metadata, config)
    vector = recruit(pooled, own, table, config.recruit)
    return ReferencePrototype(label, vector, calibrate(vector, own, searcher, metadata, table, config), own)


def mean_shot(vectors: list[np.ndarray]) -> np.ndarray:
    """One (C,) float32 vector from a class's shots: the normalised mean (the vector itself for one shot)."""
    if len(vectors) == 1:
        return vectors[0]
    mean = np.mean(np.asarray(vectors, np.float64), axis=0)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)


def own_labels(vector: np.ndarray, searcher: Searcher, metadata: SegmentMetadata,
               config: ReferenceConfig) -> list[str]:
    """The bank labels with a kNN vote share ≥ positive_share among the vector's k nearest segments."""
    candidates, shares = knn_votes(searcher, metadata, vector[None], config.k, config.temperature)
    return [c for c, s in zip(candidates, shares[0]) if c is not None and s >= config.positive_share]


def recruit(vector: np.ndarray, own: list[str], table: LabelTable, weight: float) -> np.ndarray:
    """(1 − weight) · vector + weight · (the normalised mean of the own labels' bank prototypes), normalised: the
    reference pulled toward what the bank knows of its class (a label prototype is the mean of many whole
    segments, a steadier view than one prompt). The vector itself with weight 0 or no own label."""
    rows = [i for i, label in enumerate(table.labels) if label in own]
    if weight == 0 or not rows:
        return vector
    mean = np.asarray(table.prototypes, np.float64)[rows].mean(axis=0)
    blended = (1 - weight) * vector.astype(np.float64) + weight * mean / max(np.linalg.norm(mean), 1e-12)
    return (blended / max(np.linalg.norm(blended), 1e-12)).astype(np.float32)


def calibrate(vector: np.ndarray, own: list[str], searcher: Searcher, metadata: SegmentMetadata,
              table: LabelTable, config: ReferenceConfig) -> float:
    """The cosine of the ⌈fpr·N⌉-th nearest of the N bank segments labelled outside `own` (unlabelled ones
    ignored): a region clears it only if it is closer to the prototype than all but a fraction fpr of
    other-label bank segments. With more than max_calibration_k neighbours needed, the last fetched cosine is used
    (stricter). A bank with no other label calibrates against all labelled segments."""
    counts = dict(zip(table.labels, np.asarray(table.counts, dtype=np.int64).tolist()))
    negatives = sum(n for label, n in counts.items() if label not in own)
    excluded = set(own) if negatives else set()
    total = negatives or sum(counts.values())
    rank = max(1, math.ceil(config.fpr * total))
    k = min(rank + sum(counts.get(p, 0) for p in excluded) + 64, config.max_calibration_k)
    while True:
        scores, ids = searcher.search(vector[None], k)
        labels = metadata.labels(ids[0])
        negative = np.array([ok and label is not None and label not in excluded
                             for ok, label in zip(ids[0] >= 0, labels)], dtype=bool)
        if negative.sum() >= rank:
            return float(scores[0][negative][rank - 1])
        if (ids[0] < 0).any() or k >= config.max_calibration_k:
            valid = scores[0][ids[0] >= 0]
            return float(valid[-1]) if len(valid) else 1.0
        k = min(2 * k, config.max_calibration_k)


@dataclass(frozen=True, eq=False)
class Decision:
    """Per region: assigned class number (0 = background, i = classes[i − 1]) and score; per class whether it
    was found and its best relative score over the regions (the image-level evidence)."""

    assigned: np.ndarray
    scores: np.ndarray
    exists_by_class: dict[str, bool]
    best_relative: dict[str, float]


def class_separation(table: LabelTable) -> float:
    """1 − the mean cosine between two distinct label prototypes of the bank (1 for fewer than two labels): how
    far apart the bank's classes lie, the unit of ReferenceConfig.margin. O(L·C): for unit vectors the sum of
    all pairwise cosines is ‖Σ p‖² − L."""
    prototypes = np.asarray(table.prototypes, np.float64)
    count = len(prototypes)
    if count < 2:
        return 1.0
    total = float(np.sum(prototypes.sum(axis=0) ** 2)) - float(np.sum(prototypes ** 2))
    return float(np.clip(1 - total / (count * (count - 1)), 1e-3, 2.0))


def decide(cosines: np.ndarray, relative: np.ndarray, prepared: list[ReferencePrototype],
           config: ReferenceConfig, separation: float = 1.0) -> Decision:
    """Label regions from (n, R) cosines to the R prototypes and relative scores (cosine − cosine to the nearest
    bank label outside the prototype's own labels).

    A class exists ("margin") when its best relative score over the regions reaches margin × separation
    (`class_separation` of the bank), or
    ("calibrated") when some region has cosine ≥ the prototype's threshold and relative > 0. In a class that
    exists, the regions that match are those closer to one of its prototypes than to any other bank label
    (relative > 0, or ≥ a margin ≤ 0, so the best region of a class found always matches; "calibrated": relative
    > 0 and above the threshold). A region takes the matching class with the highest relative score, else
    background; its score is that relative score (else its best over the classes).
    """
    classes = list(dict.fromkeys(p.label for p in prepared))
    owner = np.array([classes.index(p.label) for p in prepared])
    margin = config.margin * separation
    if config.decision == "calibrated":
        gate = (relative > 0) & (cosines >= np.array([p.threshold for p in prepared], dtype=np.float32))
    else:
        gate = (relative > 0) | (relative >= margin)
    key = np.where(gate, relative, -np.inf)
    class_key = np.stack([key[:, owner == c].max(axis=1) for c in range(len(classes))], axis=1)
    class_relative = np.stack([relative[:, owner == c].max(axis=1) for c in range(len(classes))], axis=1)
    best = class_relative.max(axis=0, initial=-np.inf)
    found = np.isfinite(class_key).any(axis=0) if config.decision == "calibrated" else best >= margin
    class_key = np.where(found[None, :], class_key, -np.inf)
    matched = np.isfinite(class_key)
    passed = matched.any(axis=1)
    winner = np.where(passed, class_key.argmax(axis=1), class_relative.argmax(axis=1))
    score = np.where(passed[:, None], class_key, class_relative)[np.arange(len(winner)), winner]
    return Decision(np.where(passed, winner + 1, 0), score, {c: bool(found[j]) for j, c in enumerate(classes)},
                    {c: float(best[j]) for j, c in enumerate(classes)})
