"""Tombstones: the segments a version hides from every search and metadata lookup, without touching its parts.

`tombstones/<name>.npy` holds a sorted int64 array of segment ids (np.load(allow_pickle=False)); the manifest's
`tombstones` list names every such object of the version with its count, reason and date. A reader takes the
union of them all.
"""

from __future__ import annotations

import io
import secrets
import time

import numpy as np

from bank_builder.format import storage
from bank_builder.format.errors import IndexCorruptError
from bank_builder.format.index_layout import sha256
from bank_builder.format.manifest import Manifest, TombstoneEntry
from bank_builder.format.ref import BankRef


def write_tombstones(ref: BankRef, segment_ids: np.ndarray, reason: str) -> TombstoneEntry:
    """Write a new tombstone object of `segment_ids` (sorted, unique) with `reason`; its manifest entry."""
    ids = np.unique(np.asarray(segment_ids, np.int64))
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    data = buf.getvalue()
    name = f"tombstones/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}.npy"
    storage.write_if_absent(ref.url(name), data, ref.storage_options)
    return TombstoneEntry(object=name, bytes=len(data), sha256=sha256(data), count=len(ids), reason=reason,
                          created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def read_removed(ref: BankRef, manifest: Manifest) -> np.ndarray:
    """Every segment id the version's tombstones hide: sorted, unique int64 (empty when none)."""
    arrays = [np.zeros(0, np.int64)]
    for entry in manifest.tombstones:
        data = storage.read_bytes(ref.url(entry.object), ref.storage_options)
        if sha256(data) != entry.sha256:
            raise IndexCorruptError(f"{ref.url(entry.object)} does not match the checksum in the manifest")
        ids = np.load(io.BytesIO(data), allow_pickle=False)
        if ids.dtype != np.int64 or ids.ndim != 1 or len(ids) != entry.count:
            raise IndexCorruptError(f"{ref.url(entry.object)} is not {entry.count} int64 segment ids")
        arrays.append(ids)
    return np.unique(np.concatenate(arrays))


def is_removed(removed: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Boolean mask: which of `ids` the sorted array `removed` holds."""
    if not len(removed):
        return np.zeros(len(ids), bool)
    at = np.searchsorted(removed, ids)
    return removed[np.minimum(at, len(removed) - 1)] == ids
