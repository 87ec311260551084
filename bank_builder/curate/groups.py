"""Group statistics of a bank's labels, gathered part by part: each label's centroid (the normalised mean of its
segments' visual embeddings, optionally over the members a cut keeps) and the histogram of its members'
similarities to a centroid, from which the driver reads the median and MAD.

One Ray task per part streams the part's row groups (segment ids, labels read dictionary-encoded, visual
embeddings) and returns per-label sums, counts and histograms; the driver adds them up in part-ordinal order, so
the figures are the same whatever order the tasks finish in. Tombstoned segments count nowhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from bank_builder.format import BankRef, PartEntry, parts
from bank_builder.format.tombstones import is_removed

COLUMNS = ["segment_id", "label", parts.VISUAL]


@dataclass
class GroupBlock:
    """One row group of a part: ids (n,), labels (n,) as indices into `names` (-1 = none), x (n, C) float32,
    removed (n,) bool (tombstoned)."""

    ids: np.ndarray
    codes: np.ndarray
    names: list[str]
    x: np.ndarray
    removed: np.ndarray


def iter_blocks(ref: BankRef, part: PartEntry, removed: np.ndarray) -> Iterator[GroupBlock]:
    """The part's row groups as GroupBlocks, in row order."""
    with parts.open_part(ref, part) as f:
        for g in range(f.num_row_groups):
            table = f.read_row_group(g, columns=COLUMNS)
            labels = table["label"].combine_chunks().dictionary_encode()
            ids = table["segment_id"].to_numpy()
            codes = labels.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            yield GroupBlock(ids, codes, labels.dictionary.to_pylist(), parts.matrix(table[parts.VISUAL], np.float32),
                             is_removed(removed, ids))


@dataclass
class PartGroups:
    """What one part contributes, per label it holds: sums (L, C) float64 and counts (L,) of the members taken,
    and (with centroids) histograms (L, bins) of every member's cosine to its label's centroid."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    hist: dict[str, np.ndarray] = field(default_factory=dict)


def scan_part(ref: BankRef, part: PartEntry, removed: np.ndarray, centroids: dict[str, np.ndarray] | None,
              cuts: dict[str, float] | None, bins: int) -> PartGroups:
    """Sums and counts per label of the part's members (those whose cosine to their centroid reaches their
    label's cut, when `cuts` is given), and with `centroids` the histograms of every member's cosine."""
    out = PartGroups()
    for block in iter_blocks(ref, part, removed):
        for code, name in enumerate(block.names):
            rows = np.flatnonzero((block.codes == code) & ~block.removed)
            if not len(rows):
                continue
            x = block.x[rows]
            taken = x
            if centroids is not None:
                sims = x @ centroids[name]
                out.hist[name] = out.hist.get(name, 0) + histogram(sims, bins)
                if cuts is not None and name in cuts:
                    taken = x[sims >= cuts[name]]
            out.sums[name] = out.sums.get(name, 0.0) + taken.sum(axis=0, dtype=np.float64)
            out.counts[name] = out.counts.get(name, 0) + len(taken)
    return out


def histogram(sims: np.ndarray, bins: int) -> np.ndarray:
    """(bins,) int64 counts of cosines over [-1, 1]."""
    index = np.clip(((sims + 1.0) * (bins / 2.0)).astype(np.int64), 0, bins - 1)
    return np.bincount(index, minlength=bins).astype(np.int64)


def merge(results: list[PartGroups]) -> PartGroups:
    """The sum of parts' contributions, taken in the order given (part-ordinal order: same floats every run)."""
    out = PartGroups()
    for r in results:
        for name, s in r.sums.items():
            out.sums[name] = out.sums.get(name, 0.0) + s
            out.counts[name] = out.counts.get(name, 0) + r.counts[name]
        for name, h in r.hist.items():
            out.hist[name] = out.hist.get(name, 0) + h
    return out


def centroids_of(groups: PartGroups, previous: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Label → L2-normalised mean (C,) float32 of the members summed; a label whose cut kept nobody keeps its
    previous centroid."""
    out = {}
    for name in sorted(groups.sums):
        total = np.asarray(groups.sums[name], np.float64)
        norm = np.linalg.norm(total)
        out[name] = (total / norm).astype(np.float32) if norm > 0 and groups.counts[name] else previous[name]
    return out


def median_mad(hist: np.ndarray) -> tuple[float, float]:
    """(median, MAD) of the cosines a histogram over [-1, 1] counts, at bin-centre resolution."""
    bins = len(hist)
    centres = (np.arange(bins) + 0.5) * (2.0 / bins) - 1.0
    median = _weighted_median(centres, hist)
    return median, _weighted_median(np.abs(centres - median), hist)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2.0)])
