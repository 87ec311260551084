"""`curate_bank`: group statistics pass by pass (Ray task per part) → decide pass (Ray task per part, one decisions
object each) → per-label report → publish a version whose manifest names the curation.

Passes over the parts, each streaming row groups: label sums (centroids); then per refinement round a histogram
pass (median and MAD per label) and a trimmed-sums pass (the centroid again, over the members the cut keeps);
then a last histogram pass for the final cuts; then the decide pass. The driver holds per-label vectors and
histograms only, never a part's rows.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from bank_builder.config import config_to_dict
from bank_builder.curate.config import CurationConfig
from bank_builder.curate.decide import GroupModel, LabelCounts, PartDecided, decide_part
from bank_builder.curate.groups import PartGroups, centroids_of, median_mad, merge, scan_part
from bank_builder.format import BankMismatchError, BankRef, CurationEntry, Manifest, publish, read_current
from bank_builder.format import read_manifest
from bank_builder.format.curation import write_report
from bank_builder.format.tombstones import read_removed
from bank_builder.ray_runtime import init_ray

log = logging.getLogger("refbank.curate")


@dataclass
class CurationReport:
    """What a curation run decided and published. labels: one entry per label (segments, kept, dropped by reason,
    mean within-group similarity of the kept, the group's median / MAD / cut, whether it was filtered)."""

    bank: str
    version: str | None  # published (None: the same decisions as the version's curation, nothing published)
    parent: str
    segments: int
    kept: int
    dropped: int
    dropped_by_reason: dict[str, int]
    unlabelled: dict[str, Any]
    labels: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def curate_bank(bank: str | BankRef, config: CurationConfig = CurationConfig(),
                storage_options: dict | None = None) -> CurationReport:
    """Curate the CURRENT version of `bank` and publish the next version naming the decisions.

    Deterministic: the same parts and options give the same decisions, objects and report. The parts are never
    changed; the index takes only kept segments once `refbank index` runs. BankMismatchError for a bank without a
    version; ConcurrentUpdateError (a BankMismatchError) when another writer published meanwhile (re-run)."""
    start = time.perf_counter()
    ref = bank if isinstance(bank, BankRef) else BankRef(bank, storage_options or {})
    current = read_current(ref)
    if current.version is None:
        raise BankMismatchError(f"{ref} has no published version; build it first (`refbank build`)")
    m = read_manifest(ref, current.version)
    init_ray()
    removed = read_removed(ref, m)
    model, stats = _group_model(ref, m, removed, config)
    decided = _decide(ref, m, removed, model, config)
    labels, unlabelled = _label_report(decided, model, stats)
    reasons: Counter[str] = Counter()
    for counts in (c for d in decided for c in d.labels.values()):
        reasons.update(counts.dropped)
    segments = sum(p.rows for p in m.parts)
    kept = sum(d.curated.kept for d in decided)
    body = {"options": config_to_dict(config), "segments": segments, "kept": kept, "dropped": segments - kept,
            "dropped_by_reason": dict(sorted(reasons.items())), "unlabelled": unlabelled, "labels": labels}
    report_entry = write_report(ref, body)
    entry = CurationEntry(options=config_to_dict(config), parts=[d.curated for d in decided], report=report_entry,
                          kept=kept, dropped=segments - kept, dropped_by_reason=body["dropped_by_reason"],
                          created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    version = None
    if m.curation is None or _decisions(m.curation) != _decisions(entry):
        version = publish(ref, m.with_(curation=entry, created_at=entry.created_at), current)
    log.info("curated %s %s: %d of %d segments kept (%s)", ref, m.version, kept, segments, body["dropped_by_reason"])
    return CurationReport(ref.uri, version, m.version, segments, kept, segments - kept, body["dropped_by_reason"],
                          unlabelled, labels, body["options"], round(time.perf_counter() - start, 3))


def _decisions(entry: CurationEntry) -> tuple:
    """What two curations must share to be the same: their objects per part and their options."""
    return tuple((c.part, c.object) for c in entry.parts), entry.options


def _scan_all(ref: BankRef, m: Manifest, removed: np.ndarray, centroids: dict | None, cuts: dict | None,
              config: CurationConfig) -> PartGroups:
    """One pass over every part (a Ray task each), merged in part-ordinal order."""
    task = ray.remote(num_cpus=1, max_retries=2)(scan_part)
    removed_ref, centroids_ref = ray.put(removed), ray.put(centroids)
    ordered = sorted(m.parts, key=lambda p: p.ordinal)
    refs = [task.remote(ref, p, removed_ref, centroids_ref, cuts, config.histogram_bins) for p in ordered]
    return merge(ray.get(refs))


def _group_model(ref: BankRef, m: Manifest, removed: np.ndarray,
                 config: CurationConfig) -> tuple[GroupModel, dict[str, dict[str, float]]]:
    """(the decide pass's model, per-label group figures: members, median, MAD, cut)."""
    groups = _scan_all(ref, m, removed, None, None, config)
    counts = dict(groups.counts)
    centroids = centroids_of(groups)
    for _ in range(config.refine_rounds if config.outlier_z is not None else 0):
        cuts = _cuts(_scan_all(ref, m, removed, centroids, None, config), counts, config)
        centroids = centroids_of(_scan_all(ref, m, removed, centroids, cuts, config), centroids)
    final = _scan_all(ref, m, removed, centroids, None, config)
    cuts = _cuts(final, counts, config)
    names = sorted(centroids)
    stats = {}
    for name in names:
        median, mad = median_mad(final.hist[name])
        stats[name] = {"members": counts[name], "median": round(median, 4), "mad": round(mad, 4),
                       "cut": round(cuts[name], 4) if name in cuts else None}
    dim = m.dims["visual"]
    matrix = np.stack([centroids[n] for n in names]) if names else np.zeros((0, dim), np.float32)
    cut_array = np.array([cuts.get(n, -np.inf) for n in names], np.float32)
    synonyms = None
    if config.confusion_margin is not None:
        synonyms = (matrix @ matrix.T) >= config.synonym_cosine
        np.fill_diagonal(synonyms, True)
    return GroupModel(names, matrix, cut_array, synonyms), stats


def _cuts(groups: PartGroups, counts: dict[str, int], config: CurationConfig) -> dict[str, float]:
    """Label → the cosine below which a member is an outlier: median − z × 1.4826 × MAD, for groups of at
    least min_group members (others: no cut)."""
    if config.outlier_z is None:
        return {}
    out = {}
    for name, hist in groups.hist.items():
        if counts[name] >= config.min_group:
            median, mad = median_mad(hist)
            out[name] = median - config.outlier_z * 1.4826 * mad
    return out


def _decide(ref: BankRef, m: Manifest, removed: np.ndarray, model: GroupModel,
            config: CurationConfig) -> list[PartDecided]:
    """The decide pass, a Ray task per part; answers in part-ordinal order."""
    task = ray.remote(num_cpus=1, max_retries=2)(decide_part)  # a retry writes the same content-named object
    removed_ref, model_ref = ray.put(removed), ray.put(model)
    ordered = sorted(m.parts, key=lambda p: p.ordinal)
    return ray.get([task.remote(ref, p, removed_ref, model_ref, config) for p in ordered])


def _label_report(decided: list[PartDecided], model: GroupModel,
                  stats: dict[str, dict[str, float]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one report entry per label, sorted; the unlabelled rows' entry)."""
    totals: dict[str | None, LabelCounts] = {}
    for d in decided:
        for name, c in d.labels.items():
            totals.setdefault(name, LabelCounts()).add(c)
    none = totals.pop(None, LabelCounts())
    labels = []
    for name in sorted(totals):
        c, s = totals[name], stats.get(name, {})
        labels.append({"label": name, "segments": c.segments, "kept": c.kept,
                       "dropped": dict(sorted(c.dropped.items())),
                       "mean_similarity": round(c.kept_score_sum / c.kept, 4) if c.kept else None,
                       "median": s.get("median"), "mad": s.get("mad"), "cut": s.get("cut"),
                       "filtered": s.get("cut") is not None})
    return labels, {"segments": none.segments, "kept": none.kept, "dropped": dict(sorted(none.dropped.items()))}
