"""Bank versions: immutable manifests under versions/<v>/, and the CURRENT pointer swapped atomically."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from typing import Any

from bank_builder import storage
from bank_builder.store import FORMAT_VERSION, PartInfo


class BankMismatchError(ValueError):
    """A build or reader disagrees with the bank on storage (format, encoder or build options)."""


def current_version(bank: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The live version named by <bank>/CURRENT, or None for a bank with no published version."""
    url = storage.join(bank, "CURRENT")
    if not storage.exists(url, storage_options):
        return None
    return storage.read_bytes(url, storage_options).decode().strip()


def manifest_url(bank: str, version: str) -> str:
    """URL of a version's manifest."""
    return storage.join(bank, "versions", version, "manifest.json")


def read_manifest(bank: str, version: str | None = None, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The manifest of `version` (default: CURRENT), or None when the bank has no published version."""
    version = version or current_version(bank, storage_options)
    if version is None:
        return None
    url = manifest_url(bank, version)
    if not storage.exists(url, storage_options):
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


def next_version(current: str | None) -> str:
    """The version after `current`: v000001, v000002, ..."""
    return f"v{(int(current[1:]) if current else 0) + 1:06d}"


def publish(bank: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None = None) -> str:
    """Write `manifest` as the next version, then point CURRENT at it; returns the version name."""
    parent = current_version(bank, storage_options)
    version = next_version(parent)
    manifest = {**manifest, "version": version, "parent": parent}
    storage.write_json(manifest_url(bank, version), manifest, storage_options)
    # CURRENT is swapped only after the manifest is whole: readers see the old version or the new one.
    storage.write_bytes(storage.join(bank, "CURRENT"), f"{version}\n".encode(), storage_options)
    return version
