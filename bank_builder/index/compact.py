"""Compaction: fold an index's deltas and its version's tombstones into new base list objects, as a new version.

The trained quantizer stays (copied into the new index folder, whose objects are all fresh); each list of the
new base is the old base's entries, then each delta's, less every tombstoned segment: the lists a fresh index of
the surviving segments with the same quantizer holds. Lists are read by range and written one list object at a
time, so memory stays at one object whatever the bank size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from bank_builder.format import BankNotIndexedError, BankRef, IndexEntry, index_layout, publish, read_current
from bank_builder.format import read_manifest, storage
from bank_builder.format.index_layout import ListLayout, fetch_lists, list_sources, read_directory
from bank_builder.format.tombstones import is_removed, read_removed
from bank_builder.index.objects import plan_objects

log = logging.getLogger("refbank.index")


@dataclass
class CompactReport:
    """What a compaction did: the version published (None when there was nothing to fold)."""

    bank: str
    version: str | None
    parent: str
    index_id: str  # the new index (the old one when nothing was done)
    folded_deltas: int
    removed_vectors: int  # tombstoned entries dropped from the lists
    vectors: int
    objects: int
    seconds: float


def compact_index(bank: str | BankRef, storage_options: dict | None = None,
                  object_bytes: int = 64 << 20) -> CompactReport:
    """Fold CURRENT's index deltas and tombstones into a new base and publish it as the next version.
    BankNotIndexedError when CURRENT has no index; nothing is published when there is nothing to fold."""
    start = time.perf_counter()
    ref = bank if isinstance(bank, BankRef) else BankRef(bank, storage_options or {})
    current = read_current(ref)
    m = read_manifest(ref, current.version) if current.version else None
    if m is None or m.index is None:
        raise BankNotIndexedError(f"{ref} has no indexed version to compact; run `refbank index` first")
    entry = m.index
    tombstones = [t.object for t in m.tombstones]
    if not entry.deltas and set(tombstones) <= set(entry.folded_tombstones):
        return CompactReport(ref.uri, None, m.version, entry.id, 0, 0, entry.vectors, len(entry.lists),
                             round(time.perf_counter() - start, 3))
    new_id = index_layout.new_index_id()
    objects, directory, dropped = _rewrite_lists(ref, entry, new_id, read_removed(ref, m), object_bytes)
    copy = lambda e, name=None: index_layout.write_object(  # noqa: E731 - small objects, copied as they are
        ref, new_id, name or e.object, index_layout.read_object(ref, entry.id, e)) if e else None
    kept = int(directory["count"].sum())
    compacted = entry.with_(
        id=new_id, trained=copy(entry.trained), lists=objects, deltas=[], vectors=kept,
        directory=index_layout.write_object(ref, new_id, index_layout.DIRECTORY_OBJECT,
                                            index_layout.directory_bytes(directory)),
        text=copy(entry.text, index_layout.TEXT_OBJECT), report=index_layout.REPORT_OBJECT,
        folded_tombstones=tombstones, coarse_score_mean=_mean_coarse(entry),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    storage.write_json(index_layout.index_url(ref, new_id, index_layout.REPORT_OBJECT),
                       {"compacted_from": entry.id, "folded_deltas": [d.id for d in entry.deltas],
                        "folded_tombstones": tombstones, "removed_vectors": dropped, "vectors": kept},
                       ref.storage_options)
    version = publish(ref, m.with_(index=compacted, created_at=compacted.created_at), current)
    log.info("compacted index %s into %s: %d deltas folded, %d tombstoned vectors dropped", entry.id, new_id,
             len(entry.deltas), dropped)
    return CompactReport(ref.uri, version, m.version, new_id, len(entry.deltas), dropped, kept, len(objects),
                         round(time.perf_counter() - start, 3))


def _rewrite_lists(ref: BankRef, entry: IndexEntry, new_id: str, removed: np.ndarray,
                   object_bytes: int) -> tuple[list, np.ndarray, int]:
    """Write the merged, filtered lists as new list objects; (their entries, the directory, entries dropped)."""
    layout = ListLayout(entry.code_size, entry.dim, entry.refine)
    sources = list_sources(entry)
    directories = [read_directory(ref, entry, s) for s in sources]
    sizes = sum(d["bytes"] for d in directories)
    out = np.zeros(entry.nlist, index_layout.DIRECTORY_DTYPE)
    objects, dropped = [], 0
    for n, (lo, hi) in enumerate(plan_objects(sizes, object_bytes)):
        lists = list(range(lo, hi))
        pieces = [fetch_lists(ref, entry, d, [l for l in lists if d["count"][l]], source=s).lists
                  for s, d in zip(sources, directories)]
        blobs = []
        for l in lists:
            decoded = [layout.decode(p[l], int(d["count"][l])) for p, d in zip(pieces, directories) if l in p]
            ids = np.concatenate([a.ids for a in decoded]) if decoded else np.zeros(0, np.int64)
            keep = ~is_removed(removed, ids)
            dropped += int((~keep).sum())
            codes = np.concatenate([a.codes for a in decoded])[keep] if decoded else np.zeros((0, entry.code_size))
            vectors = np.concatenate([a.vectors for a in decoded])[keep] if decoded and entry.refine else None
            blobs.append(layout.encode(ids[keep], codes, vectors))
            row = out[l:l + 1]  # a view: the field assignments write into `out`
            row["object"], row["count"], row["bytes"] = n, int(keep.sum()), len(blobs[-1])
            row["checksum"] = index_layout.list_checksum(blobs[-1])
        out["offset"][lo:hi] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])[:-1]])
        objects.append(index_layout.write_object(ref, new_id, index_layout.list_object(n), b"".join(blobs)))
    return objects, out, dropped


def _mean_coarse(entry: IndexEntry) -> float:
    """The coarse score mean of base and deltas together, weighted by their vectors."""
    base = entry.vectors - sum(d.vectors for d in entry.deltas)
    total = entry.coarse_score_mean * base + sum(d.coarse_score_mean * d.vectors for d in entry.deltas)
    return round(total / max(entry.vectors, 1), 6)
