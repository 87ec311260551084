"""`refbank info`: what a bank holds — versions with dates and parents, parts, segment and label counts, the
index layout with its deltas, tombstones, sizes on storage and the encoder spec — as one JSON-ready dict."""

from __future__ import annotations

from collections import Counter
from typing import Any

from bank_builder.format import BankRef, current_version, list_pins, list_versions
from bank_builder.format import no_version_error, published_record, read_manifest, storage
from bank_builder.lifecycle.gc import referenced_objects


def bank_info(bank: str | BankRef, version: str | None = None, storage_options: dict | None = None) -> dict[str, Any]:
    """The facts of `bank` at `version` (default CURRENT), and the list of its versions."""
    ref = bank if isinstance(bank, BankRef) else BankRef(bank, storage_options or {})
    current = current_version(ref)
    if current is None:
        raise no_version_error(ref)
    m = read_manifest(ref, version or current)
    pins = set(list_pins(ref))
    versions = []
    for v in list_versions(ref):
        record = published_record(ref, v) or {}
        versions.append({"version": v, "parent": record.get("parent"), "created_at": record.get("created_at"),
                         "published_at": record.get("published_at"), "current": v == current, "pinned": v in pins})
    return {
        "bank": ref.uri, "version": m.version, "current": current, "versions": versions,
        "encoder": {k: v for k, v in m.encoder.items() if k != "entry"}, "dims": m.dims,
        "fingerprint": m.fingerprint, "totals": m.totals,
        "labelled": sum(p.labelled for p in m.parts),
        "parts": [{"name": p.name, "ordinal": p.ordinal, "source": p.source, "rows": p.rows, "bytes": p.bytes,
                   "samples": p.samples, "rejects": p.rejects, "labelled": p.labelled} for p in m.parts],
        "tombstones": {"objects": len(m.tombstones), "segments": sum(t.count for t in m.tombstones),
                       "reasons": dict(Counter(t.reason for t in m.tombstones))},
        "index": _index_info(m),
        "storage": _sizes(ref, m),
    }


def _index_info(m) -> dict[str, Any] | None:
    index = m.index
    if index is None:
        return None
    return {"id": index.id, "factory": index.factory, "kind": index.kind, "nlist": index.nlist,
            "vectors": index.vectors, "code_size": index.code_size, "nprobe": index.nprobe,
            "refine_factor": index.refine_factor, "recall_at_k": index.recall_at_k, "labels": index.labels,
            "list_objects": len(index.lists), "created_at": index.created_at,
            "parts_indexed": len(index.parts), "parts_not_indexed": len({p.name for p in m.parts} - set(index.parts)),
            "deltas": [{"id": d.id, "vectors": d.vectors, "parts": len(d.parts), "objects": len(d.lists),
                        "coarse_score_mean": d.coarse_score_mean, "created_at": d.created_at} for d in index.deltas],
            "folded_tombstones": len(index.folded_tombstones), "coarse_score_mean": index.coarse_score_mean}


def _sizes(ref: BankRef, m) -> dict[str, int]:
    """Bytes on storage: of the objects this version uses, and of the whole bank (every version, garbage too)."""
    everything = {name: int(info.get("size") or 0)
                  for name, info in storage.list_tree(ref.uri, ref.storage_options).items()}
    used = referenced_objects(m)
    return {"version_bytes": sum(size for name, size in everything.items() if name in used),
            "bank_bytes": sum(everything.values()), "bank_objects": len(everything)}
