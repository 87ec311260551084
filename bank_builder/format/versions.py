"""Bank versions: immutable manifests under versions/<v>/, and the CURRENT pointer moved by compare-and-swap.

Publishing claims a fresh version name (the manifest is created only if absent, so two writers never share
one), then moves CURRENT from the version the writer planned from to the new one with a conditional write.
A writer whose CURRENT moved meanwhile gets ConcurrentUpdateError and publishes nothing: its manifest is
removed (or, after a crash, left as an orphan that no listing shows). On stores without conditional writes the
same steps run as plain checks and writes under the bank's lease (lease.py). `versions/<v>/published.json` marks a
version that CURRENT named; `list_versions` lists only those.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from bank_builder.format import storage
from bank_builder.format.errors import (
    BankFormatError, BankMismatchError, BankNotFoundError, ConcurrentUpdateError, StorageError,
)
from bank_builder.format.lease import LEASE_OBJECT, LeaseConfig, hold_lease
from bank_builder.format.manifest import Manifest
from bank_builder.format.ref import BankRef

log = logging.getLogger("refbank.format")

VERSION_PATTERN = re.compile(r"v(\d{6,})")
MAX_NAME_CLAIMS = 1000  # version names tried past the highest seen, should other writers keep claiming them


@dataclass(frozen=True)
class Current:
    """What CURRENT named when read (None: no version yet), with the tag a compare-and-swap checks."""

    version: str | None
    tag: str | None


def read_current(ref: BankRef) -> Current:
    """CURRENT as one read: the live version and its tag. BankFormatError when it names no version."""
    url = ref.url("CURRENT")
    data, tag = storage.read_tagged(url, ref.storage_options)
    if data is None:
        return Current(None, None)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or not VERSION_PATTERN.fullmatch(text):
        shown = repr(data[:40]) if text is None else repr(text[:40])
        raise BankFormatError(f"{url} does not name a version (it holds {shown}); it should hold one version "
                              "name such as v000001. Restore it from a backup or rebuild the bank")
    return Current(text, tag)


def current_version(ref: BankRef) -> str | None:
    """The live version named by <bank>/CURRENT, or None for a bank with no published version."""
    return read_current(ref).version


def no_version_error(ref: BankRef, then: str = "build it first (`refbank build SOURCE BANK`)") -> BankNotFoundError:
    """The error for a bank without CURRENT, telling a URI where nothing is stored (a wrong path, bucket or
    prefix?) from a bank whose first build has not published yet; `then` says what to do in the second case."""
    if not storage.list_names(ref.url(), ref.storage_options):
        return BankNotFoundError(f"no bank at {ref}: nothing is stored there; check the path (or the bucket, prefix "
                                 "and endpoint)")
    return BankNotFoundError(f"{ref} has no published version (no CURRENT); {then}")


def manifest_url(ref: BankRef, version: str) -> str:
    """URL of a version's manifest."""
    return ref.url("versions", version, "manifest.json")


def published_url(ref: BankRef, version: str) -> str:
    """URL of a version's publication record: it exists once CURRENT has named the version."""
    return ref.url("versions", version, "published.json")


def read_manifest(ref: BankRef, version: str | None = None) -> Manifest | None:
    """The manifest of `version` (default: CURRENT), or None when the bank has no published version.
    BankMismatchError for a version the bank does not have; BankFormatError for a malformed manifest."""
    version = version or current_version(ref)
    if version is None:
        return None
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise BankMismatchError(f"{version!r} is not a version name (v000001, v000002, ...)")
    url = manifest_url(ref, version)
    try:
        data = storage.read_bytes(url, ref.storage_options)
    except FileNotFoundError:
        raise BankMismatchError(f"bank {ref} has no version {version!r} (no {url})") from None
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BankFormatError(f"{url} is not valid JSON ({exc}); the manifest is damaged") from None
    return Manifest.parse(raw, f"bank {ref} version {version} manifest")


def list_versions(ref: BankRef) -> list[str]:
    """The bank's published versions, oldest first: those CURRENT has named (orphan manifests are left out)."""
    pattern = storage.join(ref.url("versions"), "*", "published.json")
    found = {p.rstrip("/").rsplit("/", 2)[-2] for p in storage.glob(pattern, ref.storage_options)}
    current = current_version(ref)
    if current is not None:
        found.add(current)  # published, but its record may not be written yet (crash right after the swap)
    return sorted(v for v in found if VERSION_PATTERN.fullmatch(v))


def published_record(ref: BankRef, version: str) -> dict[str, Any] | None:
    """A version's publication record (version, parent, created_at, published_at), or None if absent."""
    try:
        return storage.read_json(published_url(ref, version), ref.storage_options)
    except FileNotFoundError:
        return None


def publish(ref: BankRef, manifest: Manifest, expected: Current, lease: LeaseConfig = LeaseConfig()) -> str:
    """Publish `manifest` as a new version whose parent is `expected.version`, the CURRENT its writer planned
    from; returns the version name. ConcurrentUpdateError, with nothing published, when CURRENT has moved.

    On a store without conditional writes (`storage.conditional_writes`) the same steps run under the bank's
    lease (lease.py) as plain checks and writes."""
    if not storage.conditional_writes(ref.uri, ref.storage_options):
        log.warning("bank %s: the store does not honour conditional writes; publishing under the bank's lease "
                    "(%s)", ref, ref.url(LEASE_OBJECT))
        return _publish_leased(ref, manifest, expected, lease)
    parent = expected.version
    version = _claim_version(ref, manifest.with_(parent=parent), parent)
    try:
        storage.replace_if(ref.url("CURRENT"), f"{version}\n".encode(), expected.tag, ref.storage_options)
    except storage.PreconditionFailed:
        _remove_quietly(ref, "versions", version)
        raise _moved(ref, parent) from None
    _record_publication(ref, version, parent, manifest)
    return version


def _publish_leased(ref: BankRef, manifest: Manifest, expected: Current, config: LeaseConfig) -> str:
    """`publish` while holding the bank's lease: compare CURRENT, claim a free name, check the lease, move CURRENT."""
    parent = expected.version
    with hold_lease(ref, config) as lease:
        if read_current(ref).tag != expected.tag:
            raise _moved(ref, parent)
        version = _claim_version(ref, manifest.with_(parent=parent), parent)
        try:
            lease.check()
        except ConcurrentUpdateError:
            _remove_quietly(ref, "versions", version)
            raise
        storage.write_bytes(ref.url("CURRENT"), f"{version}\n".encode(), ref.storage_options)
    _record_publication(ref, version, parent, manifest)
    return version


def _moved(ref: BankRef, parent: str | None) -> ConcurrentUpdateError:
    """The error of a writer whose CURRENT moved away from `parent` before it published."""
    now = current_version(ref)
    return ConcurrentUpdateError(
        f"bank {ref}: CURRENT moved from {parent} to {now} while this run was working (another writer "
        f"published first); nothing was published. Run the same command again to apply it on top of {now}.")


def _record_publication(ref: BankRef, version: str, parent: str | None, manifest: Manifest) -> None:
    """The publication records of a version CURRENT now names (and of its parent, which a crash may have kept
    from recording itself)."""
    if parent is not None:
        _record_published(ref, parent)
    _record_published(ref, version, parent=parent, created_at=manifest.created_at)


def _claim_version(ref: BankRef, manifest: Manifest, parent: str | None) -> str:
    """Write `manifest` under the first free version name after every name in use; returns that name."""
    names = storage.list_names(ref.url("versions"), ref.storage_options)
    numbers = [int(m.group(1)) for m in map(VERSION_PATTERN.fullmatch, names + [parent or ""]) if m]
    start = max(numbers, default=0) + 1
    for number in range(start, start + MAX_NAME_CLAIMS):
        version = f"v{number:06d}"
        body = json.dumps(manifest.with_(version=version).to_dict(), indent=1, sort_keys=True) + "\n"
        try:
            storage.write_if_absent(manifest_url(ref, version), body.encode(), ref.storage_options)
            return version
        except storage.PreconditionFailed:
            continue  # another writer claimed this name a moment ago: try the next
    raise ConcurrentUpdateError(f"bank {ref}: {MAX_NAME_CLAIMS} version names after v{start:06d} were claimed "
                                "by other writers while this one tried; run the command again")


def _record_published(ref: BankRef, version: str, **fields: Any) -> None:
    """Write a version's publication record unless it exists (fields default to the manifest's)."""
    url = published_url(ref, version)
    if storage.exists(url, ref.storage_options):
        return
    if not fields:
        m = storage.read_json(manifest_url(ref, version), ref.storage_options)
        fields = {"parent": m.get("parent"), "created_at": m.get("created_at")}
    record = {"version": version, **fields, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        storage.write_if_absent(url, (json.dumps(record, sort_keys=True) + "\n").encode(), ref.storage_options)
    except storage.PreconditionFailed:
        pass  # another writer recorded it first: the same facts


def _remove_quietly(ref: BankRef, *names: str) -> None:
    """Delete a folder of objects this writer made and nothing references; a failure only leaves an orphan."""
    try:
        storage.remove_tree(ref.url(*names), ref.storage_options)
    except StorageError as exc:  # an orphan is harmless: listings skip it
        log.warning("could not remove the unpublished %s (%s); it is an orphan that no listing shows",
                    ref.url(*names), exc)


# ----------------------------------------------------------------------------------------- pins


def pin(ref: BankRef, version: str) -> None:
    """Keep `version` from garbage collection (`pins/<version>`) until unpinned."""
    if version not in list_versions(ref):
        raise BankMismatchError(f"bank {ref} has no version {version!r} to pin; available: "
                                f"{', '.join(list_versions(ref)) or 'none'}")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    storage.write_bytes(ref.url("pins", version), f"{stamp}\n".encode(), ref.storage_options)


def unpin(ref: BankRef, version: str) -> bool:
    """Let garbage collection take `version` again; False when it was not pinned."""
    url = ref.url("pins", version)
    if not storage.exists(url, ref.storage_options):
        return False
    storage.remove_tree(url, ref.storage_options)
    return True


def list_pins(ref: BankRef) -> list[str]:
    """The pinned versions, sorted."""
    return sorted(storage.list_names(ref.url("pins"), ref.storage_options))
