"""The bank's read interfaces the query modes use (kNN search, labels by id, the label table, segment vectors,
foreground scorers) as protocols, so a mode runs on the index-backed bank (query.search, query.bank) or on any
stand-in with the same methods (an exact brute-force bank in tests)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from bank_builder.synthetic import BACKGROUND_CLASSES

# Labels that are scene "stuff" rather than objects (COCO-Stuff style names, plus the synthetic corpus's
# background textures): the foreground mode's default background set.
BACKGROUND_LABELS: frozenset[str] = frozenset({
    "background", "sky", "grass", "gravel", "brick", "wall", "wall-brick", "floor", "ground", "road", "pavement",
    "sand", "snow", "dirt", "water", "sea", "river", "mountain", "hill", "tree", "bush", "ceiling", "fence",
    "field", "rock", "stone", "leaves", "building", *BACKGROUND_CLASSES,
})


@runtime_checkable
class Searcher(Protocol):
    """kNN over the bank's visual embeddings."""

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, C) float32 L2-normalised → scores (n, k) float32 inner products, best first; ids (n, k) int64, -1 where
        fewer than k were found."""


@runtime_checkable
class SegmentMetadata(Protocol):
    """Metadata lookup by bank segment id."""

    def labels(self, ids: np.ndarray) -> list[str | None]:
        """Label of each segment id (flat int64 array); None for unlabelled segments and for id -1."""


@runtime_checkable
class LabelTable(Protocol):
    """The bank's text index: one row per unique label.

    labels: L unique label strings; text: (L, D) float32 L2-normalised embeddings of TEXT_TEMPLATE.format(label);
    prototypes: (L, C) float32 L2-normalised mean visual embedding of the label's segments; counts: (L,) segments.
    """

    labels: list[str]
    text: np.ndarray
    prototypes: np.ndarray
    counts: np.ndarray


@runtime_checkable
class ForegroundScorer(Protocol):
    """Foreground probability of regions. With RegionConfig(kind="grid") a region is one patch token, so a
    RAG-SEG token-level bank (patch embedding → mask value) implements this directly."""

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, C) float32 L2-normalised region embeddings → (n,) float32 foreground scores in [0, 1]."""


@runtime_checkable
class SegmentVectors(Protocol):
    """Stored visual embeddings by bank segment id (query.bank.Bank has them)."""

    def visual_embeddings(self, segment_ids: np.ndarray) -> np.ndarray:
        """(n, C) float32 L2-normalised visual embeddings of the ids (flat int64, no -1), in order."""
