"""Helpers of the reliability tests: what a bank's content is, to compare a run that met faults or kills with a
clean one."""

from __future__ import annotations

import hashlib

from bank_builder.format import BankRef, read_manifest, storage


def digest(url: str, options: dict) -> dict:
    """What makes a bank's content: each part's entry (name, ordinal, source, rows, sha256s) and the sha256 of the
    bytes actually stored for it, and the index objects' entries when there is an index."""
    ref = BankRef(url, options)
    m = read_manifest(ref)
    stored = {p.name: hashlib.sha256(storage.read_bytes(ref.url("parts", f"{p.name}.parquet"), options)).hexdigest()
              for p in m.parts}
    index = None
    if m.index is not None:
        e = m.index
        index = [(o.object, o.sha256) for o in [e.trained, e.directory, *e.lists, *([e.text] if e.text else [])]]
    return {"parts": [(p.name, p.ordinal, p.source, p.rows, p.sha256, p.footer_sha256) for p in m.parts],
            "stored": stored, "index": index, "totals": m.totals}
