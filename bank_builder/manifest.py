"""Bank versions: immutable manifests under versions/<v>/, and the CURRENT pointer moved by compare-and-swap.

Publishing claims a fresh version name (the manifest is created only if absent, so two writers never share
one), then moves CURRENT from the version the writer planned from to the new one with a conditional write.
A writer whose CURRENT moved meanwhile gets ConcurrentUpdateError and publishes nothing: its manifest is
removed (or, after a crash, left as an orphan that no listing shows). `versions/<v>/published.json` marks a
version that CURRENT named; `list_versions` lists only those.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from bank_builder import storage
from bank_builder.store import FORMAT_VERSION, PartInfo

log = logging.getLogger("refbank.build")

VERSION_PATTERN = re.compile(r"v(\d{6,})")
MAX_NAME_CLAIMS = 1000  # version names tried past the highest seen, should other writers keep claiming them


class BankMismatchError(ValueError):
    """A build or reader disagrees with the bank on storage (format, encoder or build options)."""


class ConcurrentUpdateError(BankMismatchError):
    """CURRENT moved between a writer's plan and its publish: another writer published first."""


@dataclass(frozen=True)
class Current:
    """What CURRENT named when read (None: no version yet), with the tag a compare-and-swap checks."""

    version: str | None
    tag: str | None


def read_current(bank: str, storage_options: dict[str, Any] | None = None) -> Current:
    """CURRENT as one read: the live version and its tag. BankMismatchError when it names no version."""
    url = storage.join(bank, "CURRENT")
    data, tag = storage.read_tagged(url, storage_options)
    if data is None:
        return Current(None, None)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or not VERSION_PATTERN.fullmatch(text):
        shown = repr(data[:40]) if text is None else repr(text[:40])
        raise BankMismatchError(f"{url} does not name a version (it holds {shown}); it should hold one version "
                                f"name such as v000001. Restore it from a backup or rebuild the bank")
    return Current(text, tag)


def current_version(bank: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The live version named by <bank>/CURRENT, or None for a bank with no published version."""
    return read_current(bank, storage_options).version


def manifest_url(bank: str, version: str) -> str:
    """URL of a version's manifest."""
    return storage.join(bank, "versions", version, "manifest.json")


def read_manifest(bank: str, version: str | None = None, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The manifest of `version` (default: CURRENT), or None when the bank has no published version."""
    version = version or current_version(bank, storage_options)
    if version is None:
        return None
    url = manifest_url(bank, version)
    if not VERSION_PATTERN.fullmatch(version) or not storage.exists(url, storage_options):
        raise BankMismatchError(f"bank {bank} has no version {version!r} (no {url})")
    manifest = storage.read_json(url, storage_options)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BankMismatchError(
            f"bank {bank} version {version} has format {manifest.get('format_version')}; this refbank reads "
            f"format {FORMAT_VERSION}. Rebuild the bank or use a matching refbank release."
        )
    return manifest


def make_manifest(
    parts: list[PartInfo], encoder_spec: dict[str, Any], fingerprint: str, build: dict[str, Any]
) -> dict[str, Any]:
    """A manifest naming `parts` (sorted by ordinal) with totals; `version` and `parent` are set by `publish`."""
    parts = sorted(parts, key=lambda p: p.ordinal)
    return {
        "format_version": FORMAT_VERSION,
        "version": None,
        "parent": None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "encoder": encoder_spec,
        "dims": {"visual": encoder_spec["visual_dim"], "text": encoder_spec["text_dim"]},
        "fingerprint": fingerprint,
        "build": build,
        "parts": [asdict(p) for p in parts],
        "totals": totals(parts),
        "index": None,
    }


def totals(parts: list[PartInfo]) -> dict[str, Any]:
    """Counts over parts: parts, segments, samples, rejects and rejects by reason."""
    reasons: Counter[str] = Counter()
    for p in parts:
        reasons.update(p.reject_reasons)
    return {
        "parts": len(parts),
        "segments": sum(p.rows for p in parts),
        "samples": sum(p.samples for p in parts),
        "rejects": sum(p.rejects for p in parts),
        "reject_reasons": dict(sorted(reasons.items())),
    }


def published_url(bank: str, version: str) -> str:
    """URL of a version's publication record: it exists once CURRENT has named the version."""
    return storage.join(bank, "versions", version, "published.json")


def list_versions(bank: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The bank's published versions, oldest first: those CURRENT has named (orphan manifests are left out)."""
    fs, path = storage.url_to_fs(storage.join(bank, "versions"), storage_options)
    fs.invalidate_cache(path)  # another process may have published since this filesystem listed it
    found = {p.rstrip("/").rsplit("/", 2)[-2] for p in fs.glob(f"{path}/*/published.json")}
    current = current_version(bank, storage_options)
    if current is not None:
        found.add(current)  # published, but its record may not be written yet (crash right after the swap)
    return sorted(v for v in found if VERSION_PATTERN.fullmatch(v))


def publish(bank: str, manifest: dict[str, Any], expected: Current,
            storage_options: dict[str, Any] | None = None) -> str:
    """Publish `manifest` as a new version whose parent is `expected.version`, the CURRENT its writer planned
    from; returns the version name. ConcurrentUpdateError, with nothing published, when CURRENT has moved."""
    parent = expected.version
    version = _claim_version(bank, {**manifest, "parent": parent}, parent, storage_options)
    try:
        storage.replace_if(storage.join(bank, "CURRENT"), f"{version}\n".encode(), expected.tag, storage_options)
    except storage.PreconditionFailed:
        _remove_quietly(storage.join(bank, "versions", version), storage_options)
        now = current_version(bank, storage_options)
        raise ConcurrentUpdateError(
            f"bank {bank}: CURRENT moved from {parent} to {now} while this run was working (another writer "
            f"published first); nothing was published. Run the same command again to apply it on top of {now}."
        ) from None
    if parent is not None:
        _record_published(bank, parent, storage_options)  # a crash may have kept the parent from recording
    _record_published(bank, version, storage_options, parent=parent, created_at=manifest.get("created_at"))
    return version


def _claim_version(bank: str, manifest: dict[str, Any], parent: str | None,
                   storage_options: dict[str, Any] | None) -> str:
    """Write `manifest` under the first free version name after every name in use; returns that name."""
    fs, path = storage.url_to_fs(storage.join(bank, "versions"), storage_options)
    fs.invalidate_cache(path)
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in (fs.ls(path, detail=False) if fs.exists(path) else [])]
    numbers = [int(m.group(1)) for m in map(VERSION_PATTERN.fullmatch, names + [parent or ""]) if m]
    start = max(numbers, default=0) + 1
    for number in range(start, start + MAX_NAME_CLAIMS):
        version = f"v{number:06d}"
        body = (json.dumps({**manifest, "version": version}, indent=1, sort_keys=True) + "\n").encode()
        try:
            storage.write_if_absent(manifest_url(bank, version), body, storage_options)
            return version
        except storage.PreconditionFailed:
            continue  # another writer claimed this name a moment ago: try the next
    raise ConcurrentUpdateError(f"bank {bank}: {MAX_NAME_CLAIMS} version names after v{start:06d} were claimed "
                                "by other writers while this one tried; run the command again")


def _record_published(bank: str, version: str, storage_options: dict[str, Any] | None, **fields: Any) -> None:
    """Write a version's publication record unless it exists (fields default to the manifest's)."""
    url = published_url(bank, version)
    if storage.exists(url, storage_options):
        return
    if not fields:
        m = storage.read_json(manifest_url(bank, version), storage_options)
        fields = {"parent": m.get("parent"), "created_at": m.get("created_at")}
    record = {"version": version, **fields, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        storage.write_if_absent(url, (json.dumps(record, sort_keys=True) + "\n").encode(), storage_options)
    except storage.PreconditionFailed:
        pass  # another writer recorded it first: the same facts


def _remove_quietly(url: str, storage_options: dict[str, Any] | None) -> None:
    """Delete a folder of objects this writer made and nothing references; a failure only leaves an orphan."""
    try:
        fs, path = storage.url_to_fs(url, storage_options)
        fs.rm(path, recursive=True)
    except Exception as exc:  # noqa: BLE001 - an orphan is harmless: listings skip it
        log.warning("could not remove the unpublished %s (%s); it is an orphan that no listing shows", url, exc)
