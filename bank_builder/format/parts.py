"""Parquet parts (one per input shard): schema, segment ids, names, commit markers, rejects, and reads.

Layout under a bank (see docs/ARCHITECTURE.md):
  parts/<part>.parquet   segment rows; <part> = shard stem + hash of its URL + ordinal + build fingerprint
  parts/<part>.json      commit marker written after the Parquet object: rows, bytes, sha256, fingerprint
  rejects/<part>.parquet samples of that shard that were skipped, with the reason
Objects are created only if absent: a part, once a manifest names it, is never rewritten.

Integrity on read. Every data page carries a CRC32 (Parquet page checksums), verified as the page is decoded, so
reading a row group checks just the bytes it reads; the footer's sha256 is in the part's manifest entry and is
checked whenever the footer is read; a whole-object read checks the part's sha256. Damage raises
IndexCorruptError naming the object. (bench/part_checksums.py measured the alternatives: docs/RELIABILITY.md.)
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
from bank_builder.format.errors import IndexCorruptError
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
    pq.write_table(table, sink, row_group_size=ROW_GROUP_SIZE, compression="zstd", write_page_checksum=True)
    return sink.getvalue()


def footer_sha256(data: bytes) -> str:
    """sha256 (hex) of a Parquet object's footer: its last footer-length + 8 bytes (footer, length, magic)."""
    return hashlib.sha256(data[-(int.from_bytes(data[-8:-4], "little") + 8):]).hexdigest()


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
    info.bytes, info.sha256, info.footer_sha256 = len(data), hashlib.sha256(data).hexdigest(), footer_sha256(data)
    # The marker goes last: a part counts as done only once its whole object is on storage.
    storage.write_json(commit_url(ref, info.name), asdict(info), ref.storage_options)
    return info


def _adopt(ref: BankRef, url: str, meta: dict[str, Any]) -> bytes:
    """The bytes of an existing part object that matches `meta` (same part, shard, ordinal, fingerprint) and
    decodes whole (every page checksum holds)."""
    data = storage.read_bytes(url, ref.storage_options)
    with _damage_named(url, "delete it and run the build again"):
        found = json.loads(pq.read_schema(io.BytesIO(data)).metadata.get(PARQUET_META_KEY, b"{}"))
        pq.ParquetFile(io.BytesIO(data), page_checksum_verification=True).read()
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
    table = read_part(ref, info)
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


def read_part(ref: BankRef, part: str | PartEntry) -> pa.Table:
    """A part's whole table (tests, tools; the index streams row groups instead), checked against the part's
    sha256 when given its manifest entry, and page by page in any case."""
    name, entry = _name_entry(part)
    url = part_url(ref, name)
    data = _read_whole(ref, url)
    if entry is not None and entry.sha256 and hashlib.sha256(data).hexdigest() != entry.sha256:
        raise IndexCorruptError(f"{url} does not match the sha256 its manifest records (the object changed or "
                                f"was truncated); {_RESTORE}")
    with _damage_named(url):
        return pq.ParquetFile(io.BytesIO(data), page_checksum_verification=True).read()


def read_rejects(ref: BankRef, name: str) -> pa.Table:
    """A part's rejects table."""
    url = rejects_url(ref, name)
    data = _read_whole(ref, url)
    with _damage_named(url):
        return pq.read_table(io.BytesIO(data))


# ----------------------------------------------------------------------------------------- row-group reads

VISUAL = "visual_embedding"
FOOTER_READ = 64 << 10  # the tail fetched for a footer: one request finds footers up to this size
_RESTORE = "restore the object from a copy, or build the bank again into a new URI"


class PartFile:
    """A part opened for reading (`open_part`): pyarrow's ParquetFile, whose reads verify each page's checksum
    and raise IndexCorruptError naming the object when its bytes do not decode."""

    def __init__(self, url: str, file: pq.ParquetFile) -> None:
        self.url, self._file = url, file

    @property
    def metadata(self) -> pq.FileMetaData:
        """The footer."""
        return self._file.metadata

    @property
    def num_row_groups(self) -> int:
        """Row groups in the part."""
        return self._file.num_row_groups

    def read_row_group(self, group: int, columns: list[str] | None = None) -> pa.Table:
        """`columns` of row group `group`."""
        with _damage_named(self.url):
            return self._file.read_row_group(group, columns=columns)

    def read_row_groups(self, groups: list[int], columns: list[str] | None = None) -> pa.Table:
        """`columns` of the row groups `groups`, concatenated in that order."""
        with _damage_named(self.url):
            return self._file.read_row_groups(groups, columns=columns)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """`columns` of every row."""
        with _damage_named(self.url):
            return self._file.read(columns=columns)


@contextmanager
def open_part(ref: BankRef, part: str | PartEntry, dictionary: list[str] | None = None,
              metadata: pq.FileMetaData | None = None, windows: list[tuple[int, bytes]] | None = None
              ) -> Iterator[PartFile]:
    """A part as a PartFile over ranged reads without read-ahead: only the row groups read are fetched.

    part: its name, or better its manifest entry (size known: no size request; footer checked against the
    entry's footer sha256). dictionary: string columns to read dictionary-encoded. metadata: the footer, when
    the caller has it. windows: (offset, bytes) pieces of the object already fetched (see `column_span`)."""
    name, entry = _name_entry(part)
    url = part_url(ref, name)
    size = _size(ref, url, entry)
    if metadata is None:
        metadata = read_footer(ref, entry or name, size)
    with storage.RangeFile(url, size, ref.storage_options, windows) as f:
        with _damage_named(url):
            file = pq.ParquetFile(f, read_dictionary=dictionary, metadata=metadata, pre_buffer=True,
                                  page_checksum_verification=True)
        yield PartFile(url, file)


def read_footer(ref: BankRef, part: str | PartEntry, size: int | None = None) -> pq.FileMetaData:
    """A part's Parquet footer (row-group sizes, schema, refbank metadata), checked against the entry's footer
    sha256 when `part` is a manifest entry that records one. One request when the size is known (an entry, or
    `size`) and the footer is under FOOTER_READ bytes."""
    name, entry = _name_entry(part)
    url = part_url(ref, name)
    size = size if size is not None else _size(ref, url, entry)
    with _damage_named(url):
        tail = storage.read_range(url, max(0, size - FOOTER_READ), size, ref.storage_options)
        if len(tail) != min(size, FOOTER_READ):
            raise IndexCorruptError(f"{url} holds fewer than the {size} bytes its manifest records (truncated)")
        if len(tail) < 12 or tail[-4:] != b"PAR1":
            raise IndexCorruptError(f"{url} does not end like a Parquet file")
        need = int.from_bytes(tail[-8:-4], "little") + 8
        if need > size:
            raise IndexCorruptError(f"{url} records a footer of {need} bytes but holds {size}")
        if need > len(tail):
            tail = storage.read_range(url, size - need, size, ref.storage_options)
        footer = tail[-need:]
        if entry is not None and entry.footer_sha256 and hashlib.sha256(footer).hexdigest() != entry.footer_sha256:
            raise IndexCorruptError(f"the footer of {url} does not match the sha256 its manifest records; {_RESTORE}")
        return pq.read_metadata(io.BytesIO(footer))


def column_span(footer: pq.FileMetaData, group: int, columns: list[str]) -> tuple[int, int]:
    """Byte range [start, end) covering the chunks of `columns` (top-level names) in row group `group`: one
    ranged read of it, passed to `open_part(windows=...)`, makes the row group's read cost one request."""
    rg = footer.row_group(group)
    starts, ends, wanted = [], [], set(columns)
    for i in range(rg.num_columns):
        chunk = rg.column(i)
        if chunk.path_in_schema.split(".", 1)[0] in wanted:
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            starts.append(start)
            ends.append(start + chunk.total_compressed_size)
    if not starts:
        raise KeyError(f"row group {group} has none of the columns {columns}")
    return min(starts), max(ends)


def read_groups(ref: BankRef, part: PartEntry, footer: pq.FileMetaData, groups: list[int],
                columns: list[str]) -> list[pa.Table]:
    """`columns` of each of `groups`, one table per group, pages verified: one ranged request per group (each
    the span of its wanted column chunks), all issued together."""
    url = part_url(ref, part.name)
    spans = [column_span(footer, g, columns) for g in groups]
    with _damage_named(url):
        blobs = storage.read_ranges([url] * len(spans), [a for a, _ in spans], [b for _, b in spans],
                                    ref.storage_options)
    windows = [(start, blob) for (start, _), blob in zip(spans, blobs)]
    with open_part(ref, part, metadata=footer, windows=windows) as f:
        return [f.read_row_group(g, columns=columns) for g in groups]


def read_column(f: PartFile, group: int, column: str) -> pa.ChunkedArray:
    """One column of one row group."""
    return f.read_row_group(group, columns=[column])[column]


def matrix(column: pa.ChunkedArray | pa.Array, dtype: type = np.float16) -> np.ndarray:
    """A fixed-size-list column as an (n, width) array (null rows keep their zero slots)."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = values.type.list_size
    child = values.values.slice(values.offset * width, len(values) * width)  # `values` ignores the offset
    return np.asarray(child.to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, width)


def iter_row_groups(ref: BankRef, part: str | PartEntry, columns: list[str]) -> Iterator[pa.Table]:
    """The part's row groups in order, each as a table of `columns`."""
    with open_part(ref, part) as f:
        for i in range(f.num_row_groups):
            yield f.read_row_group(i, columns=columns)


def read_rows(ref: BankRef, part: str | PartEntry, rows: np.ndarray) -> np.ndarray:
    """Visual embeddings (len(rows), C) float16 of the given sorted row numbers; reads only their row groups."""
    out = []
    with open_part(ref, part) as f:
        sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        groups = np.searchsorted(starts, rows, side="right") - 1
        for g in np.unique(groups):
            x = matrix(f.read_row_group(int(g), columns=[VISUAL])[VISUAL])
            out.append(x[rows[groups == g] - starts[g]])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float16)


def _name_entry(part: str | PartEntry) -> tuple[str, PartEntry | None]:
    return (part.name, part) if isinstance(part, PartEntry) else (part, None)


def _size(ref: BankRef, url: str, entry: PartEntry | None) -> int:
    """The object's size: from its manifest entry, else one size request."""
    if entry is not None and entry.bytes:
        return entry.bytes
    with _damage_named(url):
        return storage.size(url, ref.storage_options)


def _read_whole(ref: BankRef, url: str) -> bytes:
    with _damage_named(url):
        return storage.read_bytes(url, ref.storage_options)


@contextmanager
def _damage_named(url: str, fix: str = _RESTORE) -> Iterator[None]:
    """Turn what a damaged or missing object makes the Parquet reader raise into IndexCorruptError naming it.
    Storage failures (StorageError) pass as they are: an unreachable store is not a damaged bank."""
    try:
        yield
    except FileNotFoundError:
        raise IndexCorruptError(f"{url} is missing, though the bank's manifest lists it; {fix}") from None
    except (pa.ArrowException, OSError, EOFError, UnicodeDecodeError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise IndexCorruptError(f"{url} is damaged ({detail}); {fix}") from None
