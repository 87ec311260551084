"""Garbage collection: delete the objects no retained version uses.

Retained: the newest `keep` published versions, CURRENT, and every pinned version (`refbank pin`). Everything
such a version names is kept — its manifest and publication record, its parts (objects, commit markers,
rejects), its index (trained quantizer, directories, list objects, deltas, label table, report) and its
tombstones. Any other object goes, unless it is younger than the grace period: a build, index run or removal
writing right now has objects no version names yet, and they are kept.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fsspec.implementations.local import LocalFileSystem

from bank_builder.format import BankRef, Manifest, current_version, list_pins, list_versions
from bank_builder.format import no_version_error, read_manifest, storage

ALWAYS_KEPT = ("CURRENT", "LEASE")  # LEASE: a writer publishing on a store without conditional writes


@dataclass
class GcReport:
    """What garbage collection deleted (or would delete, with dry_run) and what it kept."""

    bank: str
    retained_versions: list[str]
    deleted: list[str] = field(default_factory=list)  # object names relative to the bank
    deleted_bytes: int = 0
    kept_young: list[str] = field(default_factory=list)  # unreferenced but inside the grace period
    kept_objects: int = 0
    kept_bytes: int = 0
    dry_run: bool = False


def referenced_objects(m: Manifest) -> set[str]:
    """Every object name (relative to the bank) version `m` uses."""
    names = {f"versions/{m.version}/manifest.json", f"versions/{m.version}/published.json"}
    for p in m.parts:
        names |= {f"parts/{p.name}.parquet", f"parts/{p.name}.json", f"rejects/{p.name}.parquet"}
    names |= {t.object for t in m.tombstones}
    index = m.index
    if index is not None:
        folder = f"index/{index.id}"
        objects = [index.trained, index.directory, *index.lists, index.text]
        for delta in index.deltas:
            objects += [delta.directory, *delta.lists]
        names |= {f"{folder}/{o.object}" for o in objects if o is not None}
        names.add(f"{folder}/{index.report}")
    return names


def collect_garbage(bank: str | BankRef, keep: int = 3, grace_s: float = 3600.0, dry_run: bool = False,
                    storage_options: dict | None = None) -> GcReport:
    """Delete (or, with dry_run, list) the bank's objects that no retained version uses and that are older
    than `grace_s` seconds. keep: the newest published versions to retain (CURRENT and pins come on top)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (CURRENT is always kept), got {keep}")
    ref = bank if isinstance(bank, BankRef) else BankRef(bank, storage_options or {})
    versions = list_versions(ref)
    current = current_version(ref)
    if current is None:
        raise no_version_error(ref, "there is nothing to collect")
    retained = sorted(set(versions[-keep:]) | {current} | (set(list_pins(ref)) & set(versions)))
    referenced = set(ALWAYS_KEPT) | {f"pins/{v}" for v in list_pins(ref)}
    for version in retained:
        referenced |= referenced_objects(read_manifest(ref, version))
    report = GcReport(ref.uri, retained, dry_run=dry_run)
    now = time.time()
    doomed = []
    for name, info in sorted(storage.list_tree(ref.uri, ref.storage_options).items()):
        size = int(info.get("size") or 0)
        if name in referenced:
            report.kept_objects += 1
            report.kept_bytes += size
        elif now - _mtime(info) < grace_s:
            report.kept_young.append(name)
        else:
            doomed.append((name, size))
    for name, size in doomed:
        if not dry_run:
            storage.remove_tree(storage.join(ref.uri, name), ref.storage_options)  # a listed name, not a manifest's
        report.deleted.append(name)
        report.deleted_bytes += size
    if not dry_run:
        _remove_empty_folders(ref)
    return report


def _mtime(info: dict) -> float:
    """Seconds since the epoch an object was last written (local mtime, S3 LastModified)."""
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if isinstance(value, datetime):
        return value.replace(tzinfo=value.tzinfo or timezone.utc).timestamp()
    return float(value) if value is not None else 0.0


def _remove_empty_folders(ref: BankRef) -> None:
    """Local banks keep empty folders after their files go; remove them (object stores have none)."""
    fs, root = ref.fs()
    if not isinstance(fs, LocalFileSystem):
        return
    for folder, _, _ in os.walk(root, topdown=False):
        if folder != root and not os.listdir(folder):
            os.rmdir(folder)
