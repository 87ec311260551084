"""The decide pass: one Ray task per part scores every row against its label's group, decides keep or drop with a
reason, writes the part's decisions object and returns per-label counts for the report.

Reasons, first match wins: removed (a tombstone hides it), unpaired (no label), outlier (cosine to its group's
centroid below the group's cut), confused (nearer another label's centroid than its own by the margin), duplicate
(within its row group — 4096 neighbouring segments of the part — another kept segment of its label, scored
higher, is at least `duplicate_cosine` similar). A row's score is its cosine to its group's centroid.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from bank_builder.curate.config import CurationConfig
from bank_builder.curate.groups import GroupBlock, iter_blocks
from bank_builder.format import BankRef, CuratedPart, PartEntry
from bank_builder.format.curation import Decisions, write_decisions


@dataclass(frozen=True)
class GroupModel:
    """Every label's group as the decide pass sees it: labels (L, sorted), centroids (L, C) float32, cuts (L,)
    float32 (-inf: the group is not filtered), synonyms (L, L) bool (labels that count as the same concept for the
    confusion test; None: that test is off)."""

    labels: list[str]
    centroids: np.ndarray
    cuts: np.ndarray
    synonyms: np.ndarray | None = None


@dataclass
class LabelCounts:
    """One label's rows in a part: segments, kept, dropped by reason, and the sum of the kept rows' scores."""

    segments: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    kept_score_sum: float = 0.0

    def add(self, other: LabelCounts) -> None:
        """Fold another part's counts of the same label in."""
        self.segments += other.segments
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.kept_score_sum += other.kept_score_sum


@dataclass
class PartDecided:
    """A decide task's answer: the part's curation entry, counts per label (None = unlabelled rows)."""

    curated: CuratedPart
    labels: dict[str | None, LabelCounts]


def decide_part(ref: BankRef, part: PartEntry, removed: np.ndarray, model: GroupModel,
                config: CurationConfig) -> PartDecided:
    """Decide every row of `part`, write its decisions object; returns its entry and per-label counts."""
    index = {name: i for i, name in enumerate(model.labels)}
    ids, keep, reasons, scores = [], [], [], []
    counts: dict[str | None, LabelCounts] = {}
    for block in iter_blocks(ref, part, removed):
        groups = np.array([index.get(name, -1) for name in block.names] + [-1], np.int64)[block.codes]
        score = _scores(block.x, groups, model)
        reason = _reasons(block, groups, score, model, config)
        kept = np.array([r is None for r in reason], bool)
        ids.append(block.ids)
        keep.append(kept)
        reasons += reason
        scores.append(score)
        _count(counts, block, kept, reason, score)
    decisions = Decisions(np.concatenate(ids) if ids else np.zeros(0, np.int64),
                          np.concatenate(keep) if keep else np.zeros(0, bool), reasons,
                          np.concatenate(scores) if scores else np.zeros(0, np.float32))
    return PartDecided(write_decisions(ref, part, decisions), counts)


def _scores(x: np.ndarray, groups: np.ndarray, model: GroupModel) -> np.ndarray:
    """(n,) float32 cosine of each row to its group's centroid; NaN for rows without a group."""
    score = np.full(len(x), np.nan, np.float32)
    rows = np.flatnonzero(groups >= 0)
    score[rows] = np.einsum("nc,nc->n", x[rows], model.centroids[groups[rows]])
    return score


def _reasons(block: GroupBlock, groups: np.ndarray, score: np.ndarray, model: GroupModel,
             config: CurationConfig) -> list[str | None]:
    """The drop reason of each row of a block, None for the rows kept."""
    reason = np.full(len(groups), None, object)
    labelled = block.codes >= 0
    if config.drop_unpaired:
        reason[~labelled] = "unpaired"
    grouped = groups >= 0
    reason[grouped & (score < np.where(grouped, model.cuts[np.maximum(groups, 0)], -np.inf))] = "outlier"
    if model.synonyms is not None and config.confusion_margin is not None:
        rows = np.flatnonzero(grouped & (reason == None))  # noqa: E711 - elementwise on an object array
        if len(rows):
            sims = block.x[rows] @ model.centroids.T
            sims[model.synonyms[groups[rows]]] = -np.inf  # its own label and its synonyms are not "another"
            reason[rows[sims.max(axis=1) > score[rows] + config.confusion_margin]] = "confused"
    if config.duplicate_cosine is not None:
        reason[_duplicates(block.x, groups, score, reason == None, config.duplicate_cosine)] = "duplicate"  # noqa: E711
    reason[block.removed] = "removed"
    return reason.tolist()


def _duplicates(x: np.ndarray, groups: np.ndarray, score: np.ndarray, kept: np.ndarray,
                threshold: float) -> np.ndarray:
    """Rows that nearly repeat (cosine ≥ threshold) a better-scored kept row of their group, greedily: the best
    row of a set of near-copies stays."""
    out = np.zeros(len(x), bool)
    for group in np.unique(groups[kept & (groups >= 0)]):
        rows = np.flatnonzero(kept & (groups == group))
        rows = rows[np.lexsort((rows, -score[rows]))]  # best first, ties by row
        sims = x[rows] @ x[rows].T
        gone = np.zeros(len(rows), bool)
        for i in range(len(rows)):
            if not gone[i]:
                gone[i + 1:] |= sims[i, i + 1:] >= threshold
        out[rows[gone]] = True
    return out


def _count(counts: dict[str | None, LabelCounts], block: GroupBlock, kept: np.ndarray, reason: list[str | None],
           score: np.ndarray) -> None:
    """Add a block's rows to the per-label counts."""
    for code, name in [(-1, None), *enumerate(block.names)]:
        rows = np.flatnonzero(block.codes == code)
        if not len(rows):
            continue
        c = counts.setdefault(name, LabelCounts())
        c.segments += len(rows)
        c.kept += int(kept[rows].sum())
        c.dropped.update(reason[r] for r in rows if reason[r] is not None)
        c.kept_score_sum += float(np.nansum(score[rows][kept[rows]], dtype=np.float64))
