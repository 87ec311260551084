"""Parquet parts (one per input shard): schema, segment ids, names, commit markers, rejects, and reads.

Layout under a bank (see docs/ARCHITECTURE.md):
  parts/<part>.parquet   segment rows; <part> = shard stem + hash of its URL + ordinal + build fingerprint
  parts/<part>.json      commit marker written after the Parquet object: rows, bytes, sha256, fingerprint
  rejects/<part>.parquet samples of that shard that were skipped, with the reason
Objects are created only if absent: a part, once a manifest names it, is never rewritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bank_builder.format import storage
from bank_builder.format.manifest import FORMAT_VERSION, PartEntry
from bank_builder.format.ref import BankRef
from bank_builder.records import Reject, Segment

ROW_BITS = 32  # segment_id = ordinal << 32 | row: a part holds < 2**32 rows, a bank < 2**31 parts
ROW_GROUP_SIZE = 4096
PARQUET_META_KEY = b"refbank"


def segment_id(ordinal: int, row: int) -> int:
    """The int64 id of row `row` of the part with ordinal `ordinal`."""
    return (ordinal << ROW_BITS) | row


def split_segment_id(sid: int) -> tuple[int, int]:
    """(part ordinal, row) encoded in a segment id."""
    return sid >> ROW_BITS, sid & ((1 << ROW_BITS) - 1)


def shard_stem(shard_url: str) -> str:
    """A stable, readable prefix for the parts of an input shard: its file stem + 10 hex of sha1(URL)."""
    stem = re.sub(r"(\.tar)?(\.gz)?$", "", shard_url.rstrip("/").rsplit("/", 1)[-1])
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:64]
    return f"{stem}-{hashlib.sha1(shard_url.encode()).hexdigest()[:10]}"


def part_name(shard_url: str, ordinal: int, fingerprint: str) -> str:
    """The part of `shard_url` built as ordinal `ordinal` with build fingerprint `fingerprint`.

    Everything that decides a part's bytes is in its name, so an object, once a manifest lists it, is never
    rewritten: a shard given another ordinal (after a concurrent publish) becomes another object."""
    return f"{shard_stem(shard_url)}-o{ordinal}-{fingerprint[:8]}"


def part_url(ref: BankRef, name: str) -> str:
    """URL of a part's Parquet object."""
    return ref.url("parts", f"{name}.parquet")


def commit_url(ref: BankRef, name: str) -> str:
    """URL of a part's commit marker."""
    return ref.url("parts", f"{name}.json")


def rejects_url(ref: BankRef, name: str) -> str:
    """URL of a part's rejects table."""
    return ref.url("rejects", f"{name}.parquet")


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


def write_part(ref: BankRef, table: pa.Table, info: PartEntry, encoder_spec: dict[str, Any]) -> PartEntry:
    """Write a part's Parquet object, then its commit marker; returns `info` with bytes and sha256 filled.

    The object is created only if absent: a part object is never overwritten. One that exists already (an
    earlier run died before its marker, or a concurrent build wrote the same shard with the same ordinal) is
    adopted after its footer shows it was built from the same shard, ordinal and fingerprint."""
    meta = {"format_version": FORMAT_VERSION, "encoder": encoder_spec, "part": info.name,
            "ordinal": info.ordinal, "source": info.source, "fingerprint": info.fingerprint}
    data = _parquet_bytes(table, meta)
    url = part_url(ref, info.name)
    try:
        storage.write_if_absent(url, data, ref.storage_options)
    except storage.PreconditionFailed:
        data = _adopt(ref, url, meta)
    info.bytes, info.sha256 = len(data), hashlib.sha256(data).hexdigest()
    # The marker goes last: a part counts as done only once its whole object is on storage.
    storage.write_json(commit_url(ref, info.name), asdict(info), ref.storage_options)
    return info


def _adopt(ref: BankRef, url: str, meta: dict[str, Any]) -> bytes:
    """The bytes of an existing part object that matches `meta` (same part, shard, ordinal, fingerprint)."""
    data = storage.read_bytes(url, ref.storage_options)
    found = json.loads(pq.read_schema(io.BytesIO(data)).metadata.get(PARQUET_META_KEY, b"{}"))
    keys = ("part", "ordinal", "source", "fingerprint")
    if any(found.get(k) != meta[k] for k in keys):
        raise ValueError(f"{url} exists and was not built from {meta['source']} as ordinal {meta['ordinal']} "
                         f"with fingerprint {meta['fingerprint']} (its footer says "
                         f"{ {k: found.get(k) for k in keys} }); refusing to overwrite it")
    return data


def renumber_part(ref: BankRef, info: PartEntry, ordinal: int, encoder_spec: dict[str, Any]) -> PartEntry:
    """A copy of committed part `info` as ordinal `ordinal` (new segment ids and name, same rows and
    embeddings), committed like a fresh part: what a build of the same shard at that ordinal writes."""
    name = part_name(info.source, ordinal, info.fingerprint)
    table = read_part(ref, info.name)
    n = table.num_rows
    table = table.set_column(table.schema.get_field_index("segment_id"), "segment_id",
                             pa.array([segment_id(ordinal, r) for r in range(n)], pa.int64()))
    table = table.set_column(table.schema.get_field_index("part"), "part", pa.array([name] * n, pa.string()))
    rejects = read_rejects(ref, info.name)
    rejects = rejects.set_column(0, "part", pa.array([name] * rejects.num_rows, pa.string()))
    _write_new(ref, rejects_url(ref, name), _parquet_bytes(rejects))
    moved = PartEntry(**{**asdict(info), "name": name, "ordinal": ordinal, "bytes": 0, "sha256": ""})
    return write_part(ref, table.replace_schema_metadata(None), moved, encoder_spec)


def write_rejects(ref: BankRef, name: str, rejects: list[Reject]) -> None:
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
    _write_new(ref, rejects_url(ref, name), _parquet_bytes(table))


def _write_new(ref: BankRef, url: str, data: bytes) -> None:
    """Create an object that a part's name fully determines; an existing one (an earlier run's) is kept."""
    try:
        storage.write_if_absent(url, data, ref.storage_options)
    except storage.PreconditionFailed:
        pass


def read_commit(ref: BankRef, name: str) -> PartEntry | None:
    """The commit marker of a part, or None when the part was never completely written."""
    try:
        return PartEntry.parse(storage.read_json(commit_url(ref, name), ref.storage_options), f"marker of {name}")
    except FileNotFoundError:
        return None


def read_part(ref: BankRef, name: str) -> pa.Table:
    """A part's whole table (tests, tools; the index streams row groups instead)."""
    return pq.read_table(io.BytesIO(storage.read_bytes(part_url(ref, name), ref.storage_options)))


def read_rejects(ref: BankRef, name: str) -> pa.Table:
    """A part's rejects table."""
    return pq.read_table(io.BytesIO(storage.read_bytes(rejects_url(ref, name), ref.storage_options)))


# ----------------------------------------------------------------------------------------- row-group reads

VISUAL = "visual_embedding"


@contextmanager
def open_part(ref: BankRef, name: str, dictionary: list[str] | None = None,
              metadata: pq.FileMetaData | None = None) -> Iterator[pq.ParquetFile]:
    """A part as a ParquetFile over a seekable fsspec file without read-ahead: only the row groups read are
    fetched (an object-store file would otherwise fetch whole 5 MB blocks past each read).

    dictionary: string columns to read dictionary-encoded. metadata: the footer, when the caller has it."""
    fs, path = storage.url_to_fs(part_url(ref, name), ref.storage_options)
    with fs.open(path, "rb", cache_type="none") as f:
        yield pq.ParquetFile(f, read_dictionary=dictionary, metadata=metadata, pre_buffer=True)


def read_footer(ref: BankRef, name: str) -> pq.FileMetaData:
    """A part's Parquet footer (row-group sizes, schema, refbank metadata)."""
    fs, path = storage.url_to_fs(part_url(ref, name), ref.storage_options)
    with fs.open(path, "rb", cache_type="none") as f:
        return pq.read_metadata(f)


def read_column(f: pq.ParquetFile, group: int, column: str) -> pa.ChunkedArray:
    """One column of one row group."""
    return f.read_row_group(group, columns=[column])[column]


def matrix(column: pa.ChunkedArray | pa.Array, dtype: type = np.float16) -> np.ndarray:
    """A fixed-size-list column as an (n, width) array (null rows keep their zero slots)."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = values.type.list_size
    child = values.values.slice(values.offset * width, len(values) * width)  # `values` ignores the offset
    return np.asarray(child.to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, width)


def iter_row_groups(ref: BankRef, name: str, columns: list[str]) -> Iterator[pa.Table]:
    """The part's row groups in order, each as a table of `columns`."""
    with open_part(ref, name) as f:
        for i in range(f.num_row_groups):
            yield f.read_row_group(i, columns=columns)


def read_rows(ref: BankRef, name: str, rows: np.ndarray) -> np.ndarray:
    """Visual embeddings (len(rows), C) float16 of the given sorted row numbers; reads only their row groups."""
    out = []
    with open_part(ref, name) as f:
        sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        groups = np.searchsorted(starts, rows, side="right") - 1
        for g in np.unique(groups):
            x = matrix(f.read_row_group(int(g), columns=[VISUAL])[VISUAL])
            out.append(x[rows[groups == g] - starts[g]])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float16)
