"""Curation objects: which rows of a part a curation run keeps, why it drops the others, and each row's score.

Layout under a bank (see docs/ARCHITECTURE.md):
  curation/<part>-<sha256[:16]>.parquet  one row per part row, in row order: segment_id int64, keep bool,
                                         reason string (null when kept), score float32 (null: no group score)
  curation/report-<sha256[:16]>.json     the run's report: totals and one entry per label
Objects are named by their content, so they are written once and never rewritten: a run that decides the same
again names the same objects, and a part's decisions, like the part, never change under a published version. The
parts themselves are never touched: a dropped segment stays in its part, and a version without the curation entry
(or another one) sees it again. A read checks the sha256 the manifest records, or the one the name starts.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bank_builder.format import storage
from bank_builder.format.errors import IndexCorruptError
from bank_builder.format.manifest import CuratedPart, ObjectEntry, PartEntry
from bank_builder.format.ref import BankRef

FOLDER = "curation"
# Why a segment is dropped (the `reason` column): no label, ground truth or paired (ReME drops unpaired segments);
# its visual embedding disagrees with its label's group; it lies nearer another label's group than its own; it
# nearly repeats a segment of its label kept in the same part; a tombstone removed it.
REASONS = ("unpaired", "outlier", "confused", "duplicate", "removed")
_SCHEMA = pa.schema([("segment_id", pa.int64()), ("keep", pa.bool_()), ("reason", pa.string()),
                     ("score", pa.float32())])


@dataclass
class Decisions:
    """A part's decisions, in row order: segment_id (n,) int64, keep (n,) bool, reason per row (None when kept),
    score (n,) float32 (NaN: the row has no group score)."""

    segment_id: np.ndarray
    keep: np.ndarray
    reason: list[str | None]
    score: np.ndarray

    def __post_init__(self) -> None:
        bad = {r for r in self.reason if r is not None} - set(REASONS)
        if bad:
            raise ValueError(f"unknown drop reasons {sorted(bad)}; known: {', '.join(REASONS)}")


def _content_name(stem: str, data: bytes, suffix: str) -> str:
    return f"{FOLDER}/{stem}-{hashlib.sha256(data).hexdigest()[:16]}.{suffix}"


def write_decisions(ref: BankRef, part: PartEntry, decisions: Decisions) -> CuratedPart:
    """Write a part's decisions as a new content-named object (kept if it exists: the same bytes); its entry."""
    score = pa.array(decisions.score.astype(np.float32), pa.float32(), mask=np.isnan(decisions.score))
    table = pa.Table.from_arrays([pa.array(decisions.segment_id, pa.int64()), pa.array(decisions.keep, pa.bool_()),
                                  pa.array(decisions.reason, pa.string()), score], schema=_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    data = sink.getvalue()
    name = _content_name(part.name, data, "parquet")
    _write_once(ref, name, data)
    return CuratedPart(part=part.name, object=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                       rows=len(decisions.keep), kept=int(decisions.keep.sum()))


def read_decisions(ref: BankRef, curated: CuratedPart | str) -> Decisions:
    """A part's decisions, from its manifest entry or its object name, checked against the sha256 it records."""
    name, expected = (curated.object, curated.sha256) if isinstance(curated, CuratedPart) else (curated, None)
    data = _read_checked(ref, name, expected)
    try:
        table = pq.read_table(io.BytesIO(data))
        return Decisions(table["segment_id"].to_numpy(), table["keep"].to_numpy(zero_copy_only=False).astype(bool),
                         table["reason"].to_pylist(),
                         table["score"].to_numpy(zero_copy_only=False).astype(np.float32))
    except (pa.ArrowException, KeyError, ValueError) as exc:
        raise IndexCorruptError(f"{ref.url(name)} is not a curation object ({exc})") from None


def keep_mask(ref: BankRef, curated: CuratedPart | str | None, rows: int) -> np.ndarray | None:
    """(rows,) bool: the part rows a curation keeps; None for an uncurated part (every row counts)."""
    if curated is None or curated == "":
        return None
    keep = read_decisions(ref, curated).keep
    if len(keep) != rows:
        raise IndexCorruptError(f"{ref.url(curated if isinstance(curated, str) else curated.object)} decides "
                                f"{len(keep)} rows, its part has {rows}; curate the bank again")
    return keep


def write_report(ref: BankRef, report: dict[str, Any]) -> ObjectEntry:
    """Write a curation run's report as a content-named JSON object; its entry (name relative to the bank)."""
    data = (json.dumps(report, indent=1, sort_keys=True) + "\n").encode()
    name = _content_name("report", data, "json")
    _write_once(ref, name, data)
    return ObjectEntry(name, len(data), hashlib.sha256(data).hexdigest())


def read_report(ref: BankRef, entry: ObjectEntry) -> dict[str, Any]:
    """A curation report, checked against its recorded sha256."""
    return json.loads(_read_checked(ref, entry.object, entry.sha256))


def _write_once(ref: BankRef, name: str, data: bytes) -> None:
    try:
        storage.write_if_absent(ref.url(name), data, ref.storage_options)
    except storage.PreconditionFailed:
        pass  # its name is its content: an earlier run wrote these bytes


def _read_checked(ref: BankRef, name: str, expected: str | None) -> bytes:
    url = ref.url(name)
    try:
        data = storage.read_bytes(url, ref.storage_options)
    except FileNotFoundError:
        raise IndexCorruptError(f"{url} is missing, though the bank's manifest names it; run `refbank curate` "
                                "again") from None
    digest = hashlib.sha256(data).hexdigest()
    stem = name.rsplit(".", 1)[0]
    if (expected is not None and digest != expected) or (expected is None and not stem.endswith(digest[:16])):
        raise IndexCorruptError(f"{url} does not match its checksum (the object changed or was truncated); run "
                                "`refbank curate` again")
    return data
