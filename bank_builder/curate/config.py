"""The options of a curation run (recorded in the manifest's curation entry)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CurationConfig:
    """What a curation run drops, and how it decides.

    drop_unpaired: drop segments without a label (ReME's rule: a segment no phrase paired with is not a reference).
    outlier_z: drop a segment whose similarity to its label's group centroid lies more than this many robust
    standard deviations (1.4826 × MAD) below the group's median; None: no outlier filtering. refine_rounds: times
    the centroid is computed again from the members the previous cut kept (the median and MAD are always over
    every member). min_group: groups smaller than this are not filtered (their statistics mean little), only
    scored. confusion_margin: also drop a segment whose cosine to another label's centroid exceeds its own by
    more than this (None: off); labels whose centroids lie within `synonym_cosine` of its own (phrase variants:
    "kitten", "tabby cat") do not count as another. duplicate_cosine: of two kept segments of one label in one
    part at least this similar, keep the better-scored one (None: off). histogram_bins: resolution of the
    per-group similarity histograms the median and MAD are read from (cosine / bins wide)."""

    drop_unpaired: bool = True
    outlier_z: float | None = 3.0
    refine_rounds: int = 0
    min_group: int = 8
    confusion_margin: float | None = None
    synonym_cosine: float = 0.9
    duplicate_cosine: float | None = 0.99
    histogram_bins: int = 4000

    def __post_init__(self) -> None:
        if self.outlier_z is not None and self.outlier_z <= 0:
            raise ValueError(f"CurationConfig.outlier_z={self.outlier_z}: use a positive number, or None for none")
        if self.refine_rounds < 0 or self.min_group < 2 or self.histogram_bins < 100:
            raise ValueError("CurationConfig needs refine_rounds >= 0, min_group >= 2 and histogram_bins >= 100")
        if self.duplicate_cosine is not None and not 0.0 < self.duplicate_cosine <= 1.0:
            raise ValueError(f"CurationConfig.duplicate_cosine={self.duplicate_cosine}: use a cosine in (0, 1], "
                             "or None")
