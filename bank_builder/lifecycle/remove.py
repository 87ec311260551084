"""Removals (takedowns): publish a version whose tombstones hide the chosen segments from every search and
metadata lookup at once, without rebuilding anything.

Segments are chosen by input shard, image key, label, or segment id (any mix); the reason is recorded with the
tombstone. The index's label table is updated from its sums, so the removed segments leave each label's
prototype and count too. `refbank compact` later folds the tombstones into the index's lists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from bank_builder.format import BankMismatchError, BankRef, Manifest, index_layout, parts, publish, read_current
from bank_builder.format import no_version_error, read_manifest
from bank_builder.format.index_layout import read_label_table
from bank_builder.format.tombstones import is_removed, read_removed, write_tombstones
from bank_builder.index.text import write_table


@dataclass(frozen=True)
class Removal:
    """What to remove: segments of these input shards (source URLs), images (keys), labels, or segment ids; and
    why (recorded with the tombstone)."""

    shards: tuple[str, ...] = ()
    image_keys: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    segment_ids: tuple[int, ...] = ()
    reason: str = "removed"

    def __post_init__(self) -> None:
        if not (self.shards or self.image_keys or self.labels or self.segment_ids):
            raise ValueError("say what to remove: shards, image keys, labels or segment ids")
        if not self.reason.strip():
            raise ValueError("give a reason: it is recorded with the tombstone")


@dataclass
class RemovalReport:
    """What a removal did: the version published (None when everything asked for was removed already)."""

    bank: str
    version: str | None
    parent: str
    matched: int  # segments the selectors match
    removed: int  # of them, newly hidden by this version
    already_removed: int
    by_selector: dict[str, int] = field(default_factory=dict)
    labels_updated: int = 0
    seconds: float = 0.0


def remove_segments(bank: str | BankRef, removal: Removal,
                    storage_options: dict | None = None) -> RemovalReport:
    """Publish the next version of `bank` with a tombstone for the segments `removal` selects.

    BankMismatchError when a selector matches nothing in the bank (a typo, or the wrong bank), or (its
    ConcurrentUpdateError kind) when another writer published meanwhile: nothing is published then; re-run."""
    start = time.perf_counter()
    ref = bank if isinstance(bank, BankRef) else BankRef(bank, storage_options or {})
    current = read_current(ref)
    if current.version is None:
        raise no_version_error(ref, "there is nothing to remove")
    m = read_manifest(ref, current.version)
    ids, by = matching_ids(ref, m, removal)
    before = read_removed(ref, m)
    new = ids[~is_removed(before, ids)]
    report = RemovalReport(ref.uri, None, m.version, len(ids), len(new), len(ids) - len(new), by)
    if len(new):
        tombstone = write_tombstones(ref, new, removal.reason)
        index, report.labels_updated = _without_labels(ref, m, new)
        totals = {**m.totals, "removed": len(before) + len(new)}
        report.version = publish(ref, m.with_(tombstones=[*m.tombstones, tombstone], index=index, totals=totals,
                                              created_at=tombstone.created_at), current)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def matching_ids(ref: BankRef, m: Manifest, removal: Removal) -> tuple[np.ndarray, dict[str, int]]:
    """(sorted unique segment ids the selectors match in version `m`, matches per selector value).
    BankMismatchError naming every selector value that matches nothing."""
    found, by, missing = [], {}, []
    sources = {p.source: p for p in m.parts}
    for shard in removal.shards:
        part = sources.get(shard)
        if part is None:
            missing.append(f"shard {shard!r}")
            continue
        found.append(parts.segment_id(part.ordinal, 0) + np.arange(part.rows, dtype=np.int64))
        by[f"shard:{shard}"] = part.rows
    if removal.image_keys or removal.labels:
        scanned, counts = _scan(ref, m, set(removal.image_keys), set(removal.labels))
        found.append(scanned)
        by.update(counts)
        missing += [f"image key {k!r}" for k in removal.image_keys if not counts.get(f"image_key:{k}")]
        missing += [f"label {k!r}" for k in removal.labels if not counts.get(f"label:{k}")]
    if removal.segment_ids:
        ids = np.unique(np.asarray(removal.segment_ids, np.int64))
        by_ordinal = m.part_by_ordinal
        ordinals, rows = ids >> parts.ROW_BITS, ids & ((1 << parts.ROW_BITS) - 1)
        known = np.array([o in by_ordinal and r < by_ordinal[o].rows for o, r in zip(ordinals.tolist(),
                                                                                      rows.tolist())], bool)
        missing += [f"segment id {int(i)}" for i in ids[~known][:10]]
        found.append(ids[known])
        by["segment_ids"] = int(known.sum())
    if missing:
        raise BankMismatchError(f"bank {ref} version {m.version} has nothing matching "
                                f"{', '.join(missing)}; nothing was removed")
    return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64), by


def _scan(ref: BankRef, m: Manifest, keys: set[str], labels: set[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Segment ids whose image key is in `keys` or label in `labels`, reading those two columns of every part."""
    found, counts = [], {}
    for part in m.parts:
        for table in parts.iter_row_groups(ref, part.name, ["segment_id", "image_key", "label"]):
            image_keys, names = table["image_key"].to_pylist(), table["label"].to_pylist()
            hit = np.array([k in keys or n in labels for k, n in zip(image_keys, names)], bool)
            if hit.any():
                found.append(table["segment_id"].to_numpy()[hit])
                for k, n in zip(np.array(image_keys, object)[hit], np.array(names, object)[hit]):
                    if k in keys:
                        counts[f"image_key:{k}"] = counts.get(f"image_key:{k}", 0) + 1
                    if n in labels:
                        counts[f"label:{n}"] = counts.get(f"label:{n}", 0) + 1
    return (np.concatenate(found) if found else np.zeros(0, np.int64)), counts


def _without_labels(ref: BankRef, m: Manifest, removed: np.ndarray):
    """(the index entry whose label table no longer counts the removed segments, labels in it); the entry as
    it is when the version has no index or no label table."""
    index = m.index
    table = read_label_table(ref, index) if index is not None else None
    if table is None:
        return index, 0
    names, sums, counts = _label_sums(ref, m, removed)
    if not counts:
        return index, len(table.labels)
    updated = table.merged({}, sums, counts, sign=-1)
    name = f"text-{index_layout.new_index_id()}.npz"
    text = write_table(ref, index.id, updated, name)
    return index.with_(text=text, labels=len(updated.labels)), len(updated.labels)


def _label_sums(ref: BankRef, m: Manifest, ids: np.ndarray) -> tuple[list[str], dict, dict]:
    """(labels, label → sum of the visual embeddings of `ids` that carry it, label → count), reading only the
    row groups that hold them."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    by_ordinal = m.part_by_ordinal
    for ordinal in np.unique(ids >> parts.ROW_BITS).tolist():
        part = by_ordinal[ordinal]
        wanted = set((ids[(ids >> parts.ROW_BITS) == ordinal]).tolist())
        for table in parts.iter_row_groups(ref, part.name, ["segment_id", "label", parts.VISUAL]):
            hit = np.array([i in wanted for i in table["segment_id"].to_pylist()], bool)
            if not hit.any():
                continue
            vectors = parts.matrix(table[parts.VISUAL], np.float32)[hit]
            for name, vector in zip(np.array(table["label"].to_pylist(), object)[hit], vectors):
                if name is not None:
                    sums[name] = sums.get(name, 0.0) + vector.astype(np.float64)
                    counts[name] = counts.get(name, 0) + 1
    return sorted(sums), sums, counts
