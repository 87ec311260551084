"""Parquet parts (one per input shard), their commit markers, and the atomically published manifest.

Layout under a bank URI (see docs/ARCHITECTURE.md):
  parts/<part>.parquet   segment rows; <part> is derived from the input shard URL
  parts/<part>.json      commit marker written after the Parquet object: rows, bytes, sha256, fingerprint
  rejects/<part>.parquet samples of that shard that were skipped, with the reason
  versions/<v>/manifest.json, CURRENT
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bank_builder import storage
from bank_builder.records import Reject, Segment

FORMAT_VERSION = 1
ROW_BITS = 32  # segment_id = ordinal << 32 | row: a part holds < 2**32 rows, a bank < 2**31 parts
ROW_GROUP_SIZE = 4096
PARQUET_META_KEY = b"refbank"


def segment_id(ordinal: int, row: int) -> int:
    """The int64 id of row `row` of the part with ordinal `ordinal`."""
    return (ordinal << ROW_BITS) | row


def split_segment_id(sid: int) -> tuple[int, int]:
    """(part ordinal, row) encoded in a segment id."""
    return sid >> ROW_BITS, sid & ((1 << ROW_BITS) - 1)


def part_name(shard_url: str) -> str:
    """A stable part name for an input shard: readable stem + hash of the full URL (no twins on re-run)."""
    stem = re.sub(r"(\.tar)?(\.gz)?$", "", shard_url.rstrip("/").rsplit("/", 1)[-1])
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:64]
    return f"{stem}-{hashlib.sha1(shard_url.encode()).hexdigest()[:10]}"


def part_url(bank: str, name: str) -> str:
    """URL of a part's Parquet object."""
    return storage.join(bank, "parts", f"{name}.parquet")


def commit_url(bank: str, name: str) -> str:
    """URL of a part's commit marker."""
    return storage.join(bank, "parts", f"{name}.json")


def rejects_url(bank: str, name: str) -> str:
    """URL of a part's rejects table."""
    return storage.join(bank, "rejects", f"{name}.parquet")


@dataclass
class SegmentRows:
    """Per-segment metadata columns, in row order (bbox XYXY pixels, rle COCO {"size", "counts"})."""

    image_key: list[str] = field(default_factory=list)
    segment_index: list[int] = field(default_factory=list)
    label: list[str | None] = field(default_factory=list)
    label_source: list[str] = field(default_factory=list)
    bbox: list[tuple[int, int, int, int]] = field(default_factory=list)
    area: list[int] = field(default_factory=list)
    rle: list[dict[str, Any]] = field(default_factory=list)
    mask_kind: list[str] = field(default_factory=list)  # what cut the segment: instance/class/binary/rle/superpixel

    def add(self, image_key: str, segments: list[Segment]) -> None:
        """Append the segments of one image."""
        for s in segments:
            self.image_key.append(image_key)
            self.segment_index.append(s.index)
            self.label.append(s.label)
            self.label_source.append(s.label_source.value)
            self.bbox.append(tuple(int(v) for v in s.bbox))
            self.area.append(int(s.area))
            self.rle.append({"size": [int(v) for v in s.rle["size"]], "counts": s.rle["counts"]})
            self.mask_kind.append(s.mask_kind)

    def __len__(self) -> int:
        return len(self.image_key)


@dataclass
class PartInfo:
    """What the manifest records about one committed part."""

    name: str
    ordinal: int
    source: str
    rows: int
    bytes: int
    sha256: str
    samples: int
    rejects: int
    reject_reasons: dict[str, int]
    fingerprint: str
    labelled: int = 0  # segments with a label
    unlabelled_by_kind: dict[str, int] = field(default_factory=dict)  # the others, by the mask kind that cut them


def part_schema(visual_dim: int, text_dim: int | None) -> pa.Schema:
    """Arrow schema of a part; embeddings are fixed-size float16 lists, text nullable."""
    text_type = pa.list_(pa.float16(), text_dim if text_dim else 1)
    return pa.schema(
        [
            ("segment_id", pa.int64()),
            ("part", pa.string()),
            ("image_key", pa.string()),
            ("segment_index", pa.int32()),
            ("label", pa.string()),
            ("label_source", pa.string()),
            ("bbox", pa.list_(pa.int32(), 4)),
            ("area", pa.int64()),
            ("mask", pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])),
            ("mask_kind", pa.string()),
            ("quality", pa.float32()),
            ("visual_embedding", pa.list_(pa.float16(), visual_dim)),
            ("text_embedding", text_type),
        ]
    )


def _fixed_list(values: np.ndarray, width: int, valid: np.ndarray | None = None) -> pa.Array:
    """(n, width) array → FixedSizeListArray; rows where `valid` is False are null."""
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width, mask=mask)


def part_table(
    name: str, ordinal: int, rows: SegmentRows, visual: np.ndarray, quality: np.ndarray,
    text: list[np.ndarray | None], text_dim: int | None,
) -> pa.Table:
    """The Arrow table of a part: visual (n, C) float16, quality (n,) float32, text one (D,) or None per row."""
    n, width = visual.shape
    text_width = text_dim or 1
    text_valid = np.array([t is not None for t in text], dtype=bool)
    text_values = np.zeros((n, text_width), dtype=np.float16)
    for i, t in enumerate(text):
        if t is not None:
            text_values[i] = t
    columns = [
        pa.array([segment_id(ordinal, r) for r in range(n)], pa.int64()),
        pa.array([name] * n, pa.string()),
        pa.array(rows.image_key, pa.string()),
        pa.array(rows.segment_index, pa.int32()),
        pa.array(rows.label, pa.string()),
        pa.array(rows.label_source, pa.string()),
        _fixed_list(np.asarray(rows.bbox, dtype=np.int32).reshape(n, 4), 4),
        pa.array(rows.area, pa.int64()),
        pa.array(rows.rle, part_schema(1, None).field("mask").type),
        pa.array(rows.mask_kind, pa.string()),
        pa.array(quality.astype(np.float32)),
        _fixed_list(visual.astype(np.float16), width),
        _fixed_list(text_values, text_width, text_valid),
    ]
    return pa.Table.from_arrays(columns, schema=part_schema(width, text_dim))


def _parquet_bytes(table: pa.Table, metadata: dict[str, Any] | None = None) -> bytes:
    """Serialise `table` as zstd Parquet, with refbank metadata in the file footer."""
    if metadata is not None:
        table = table.replace_schema_metadata({PARQUET_META_KEY: json.dumps(metadata, sort_keys=True).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    return sink.getvalue()


def write_part(
    bank: str, table: pa.Table, info: PartInfo, encoder_spec: dict[str, Any], storage_options: dict[str, Any]
) -> PartInfo:
    """Write a part's Parquet object, then its commit marker; returns `info` with bytes and sha256 filled."""
    meta = {"format_version": FORMAT_VERSION, "encoder": encoder_spec, "part": info.name,
            "ordinal": info.ordinal, "source": info.source, "fingerprint": info.fingerprint}
    data = _parquet_bytes(table, meta)
    storage.write_bytes(part_url(bank, info.name), data, storage_options)
    info.bytes, info.sha256 = len(data), hashlib.sha256(data).hexdigest()
    # The marker goes last: a part counts as done only once its whole object is on storage.
    storage.write_json(commit_url(bank, info.name), asdict(info), storage_options)
    return info


def write_rejects(bank: str, name: str, rejects: list[Reject], storage_options: dict[str, Any]) -> None:
    """Write the rejects table of one part (an empty table when nothing was rejected)."""
    table = pa.table(
        {
            "part": pa.array([name] * len(rejects), pa.string()),
            "shard": pa.array([r.shard for r in rejects], pa.string()),
            "key": pa.array([r.key for r in rejects], pa.string()),
            "reason": pa.array([r.reason.value for r in rejects], pa.string()),
            "detail": pa.array([r.detail for r in rejects], pa.string()),
        }
    )
    storage.write_bytes(rejects_url(bank, name), _parquet_bytes(table), storage_options)


def read_commit(bank: str, name: str, storage_options: dict[str, Any]) -> PartInfo | None:
    """The commit marker of a part, or None when the part was never completely written."""
    url = commit_url(bank, name)
    if not storage.exists(url, storage_options):
        return None
    return PartInfo(**storage.read_json(url, storage_options))


def read_part(bank: str, name: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """A part's whole table (tests, tools; the index streams row groups instead)."""
    return pq.read_table(io.BytesIO(storage.read_bytes(part_url(bank, name), storage_options)))


def read_rejects(bank: str, name: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """A part's rejects table."""
    return pq.read_table(io.BytesIO(storage.read_bytes(rejects_url(bank, name), storage_options)))
