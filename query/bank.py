"""Open one bank version for serving: the manifest, the encoder check, and per-segment reads by id.

A segment id is `part ordinal << 32 | row` (bank_builder.store), so a lookup goes straight to the row
groups that hold the rows: the part's Parquet footer (cached per part) says where each row group starts,
and only those row groups, and only the columns asked for, are read.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import MISSING, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bank_builder import manifest, storage, store
from bank_builder.encoders.base import EncoderSpec
from bank_builder.index import layout
from bank_builder.index.build import INDEX_FORMAT
from bank_builder.index.source import matrix
from bank_builder.index.text import TextIndex
from bank_builder.manifest import BankMismatchError

log = logging.getLogger("refbank.query")

VISUAL = "visual_embedding"
# What `Bank.metadata` returns per segment: everything but the embeddings (the bulk of a row).
METADATA_COLUMNS = ["segment_id", "part", "image_key", "segment_index", "label", "label_source", "bbox", "area",
                    "mask", "quality"]
SPEC_FIELDS = [f.name for f in fields(EncoderSpec)]


def list_versions(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names of the versions under <uri>/versions/, sorted (published or not: CURRENT names the live one)."""
    fs, path = storage.url_to_fs(storage.join(uri, "versions"), storage_options)
    fs.invalidate_cache(path)  # another process may have published since this filesystem listed it
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def encoder_differences(recorded: dict[str, Any], expected: EncoderSpec | dict[str, Any]) -> dict[str, tuple]:
    """{field: (bank's value, expected value)} for every encoder-spec field that differs (missing = None)."""
    want = expected.to_dict() if isinstance(expected, EncoderSpec) else dict(expected)
    diff = {}
    for name in SPEC_FIELDS:
        have, need = recorded.get(name), want.get(name)
        if isinstance(have, (list, tuple)) and isinstance(need, (list, tuple)):
            have, need = list(have), list(need)  # mean/std: tuples in the dataclass, lists in JSON
        if have != need:
            diff[name] = (have, need)
    return diff


def open_bank(uri: str, version: str | None = None, storage_options: dict[str, Any] | None = None,
              expected_encoder: EncoderSpec | dict[str, Any] | None = None) -> Bank:
    """The bank at `uri`, at `version` (default: CURRENT), checked against the encoder that will query it.

    Raises BankMismatchError when the bank has no such version (the message lists those it has), when its
    format or index format is not the one this refbank reads, or when `expected_encoder` differs from the
    encoder spec the bank records (the message names each differing field with both values)."""
    so = dict(storage_options or {})
    versions = list_versions(uri, so)
    current = manifest.current_version(uri, so)
    version = version or current
    if version is None:
        raise BankMismatchError(f"{uri} has no published version (no CURRENT); build it first (`refbank build`)")
    if version not in versions:
        raise BankMismatchError(f"bank {uri} has no version {version!r}; available: {', '.join(versions) or 'none'}"
                                f" (CURRENT: {current})")
    m = manifest.read_manifest(uri, version, so)  # raises on a format this refbank cannot read
    index = m.get("index")
    if index and index.get("format") != INDEX_FORMAT:
        raise BankMismatchError(f"bank {uri} version {version} has index format {index.get('format')}; this "
                                f"refbank reads {INDEX_FORMAT}. Rebuild the index with `refbank index`.")
    if expected_encoder is not None:
        diff = encoder_differences(m["encoder"], expected_encoder)
        if diff:
            detail = "; ".join(f"{k}: bank has {a!r}, encoder has {b!r}" for k, (a, b) in diff.items())
            raise BankMismatchError(f"bank {uri} version {version} was built with another encoder ({detail}). "
                                    "Query it with the encoder it records, or rebuild the bank with this one.")
    return Bank(uri, m, so, versions)


class Bank:
    """One opened bank version: its manifest, and reads of segment rows by id (thread-safe).

    Build with `open_bank`. `versions` lists the versions on storage when it was opened."""

    def __init__(self, uri: str, manifest_: dict[str, Any], storage_options: dict[str, Any],
                 versions: list[str]) -> None:
        self.uri, self.manifest, self.storage_options, self.versions = uri, manifest_, storage_options, versions
        self.version: str = manifest_["version"]
        self._parts = {p["ordinal"]: p for p in manifest_["parts"]}
        self._footers: dict[str, pq.FileMetaData] = {}
        self._lock = threading.Lock()
        self._labels: dict[int, np.ndarray] = {}  # part ordinal → label code per row (see `labels`)
        self._vocabulary_index: dict[str, int] = {}
        self._vocabulary: list[str] = []
        self._counts = {"footers_read": 0, "row_groups_read": 0, "label_parts_loaded": 0}

    @property
    def spec(self) -> EncoderSpec:
        """The encoder spec the bank was built with."""
        recorded = self.manifest["encoder"]
        missing = [f.name for f in fields(EncoderSpec) if f.name not in recorded and f.default is MISSING]
        if missing:
            raise BankMismatchError(f"bank {self.uri} version {self.version} records an incomplete encoder spec "
                                    f"(missing {', '.join(missing)}); it was not built by `refbank build`")
        return EncoderSpec.from_dict({f: recorded[f] for f in SPEC_FIELDS if f in recorded})

    @property
    def dims(self) -> dict[str, int | None]:
        """{"visual": C, "text": D or None}: widths of the stored embeddings."""
        return dict(self.manifest["dims"])

    @property
    def index(self) -> dict | None:
        """The manifest's `index` entry (slice table, trained object, nprobe), or None before `refbank index`."""
        return self.manifest.get("index")

    def text_index(self) -> TextIndex:
        """The exact label-text index of this version (vocabulary mode); raises when there is none."""
        if not self.index or not self.index.get("text"):
            raise BankMismatchError(f"bank {self.uri} version {self.version} has no text index (no index, or no "
                                    "segment with a label text); run `refbank index` on a bank with labels")
        data = layout.read_object(self.uri, self.index["id"], self.index["text"], self.storage_options)
        return TextIndex.from_bytes(data)

    def metadata(self, segment_ids: np.ndarray | list[int]) -> list[dict[str, Any]]:
        """One dict per id, in order: segment_id, part, image_key, segment_index, label, label_source, bbox
        (XYXY pixels), area, mask (COCO RLE {size, counts}), quality. Unknown id → KeyError naming it."""
        return self._rows(segment_ids, METADATA_COLUMNS).to_pylist()

    def visual_embeddings(self, segment_ids: np.ndarray | list[int]) -> np.ndarray:
        """(n, C) float32 visual embeddings (L2-normalised, stored as float16) of the ids, in order."""
        table = self._rows(segment_ids, ["segment_id", VISUAL])
        return matrix(table[VISUAL], np.float32)

    def labels(self, segment_ids: np.ndarray | list[int]) -> list[str | None]:
        """Label of each id (flat int64), in order; None for an unlabelled segment and for -1 (no search hit).

        From memory: the first call that touches a part reads that part's label column (kept, 4 bytes a row),
        so kNN votes over thousands of ids cost no storage reads after warm-up. Unknown id → KeyError."""
        ids = np.asarray(segment_ids, dtype=np.int64).reshape(-1)
        hit = ids != -1
        codes = np.full(len(ids), -1, np.int32)
        ordinals, rows = self._locate(ids[hit])
        where = np.flatnonzero(hit)
        for o in np.unique(ordinals):
            mine = ordinals == o
            codes[where[mine]] = self._label_codes(int(o))[rows[mine]]
        vocabulary = self._vocabulary
        return [vocabulary[c] if c >= 0 else None for c in codes.tolist()]

    def stats(self) -> dict[str, int]:
        """Counters since open: Parquet footers read (once per part), row groups read by metadata /
        visual_embeddings, parts whose label column `labels` has loaded."""
        with self._lock:
            return dict(self._counts)

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part ordinal, row) of each id; KeyError naming the first id that is not in this version."""
        ordinals, rows = ids >> store.ROW_BITS, ids & ((1 << store.ROW_BITS) - 1)
        for o in np.unique(ordinals):
            part = self._parts.get(int(o))
            mine = np.flatnonzero(ordinals == o)
            bad = mine if part is None else mine[rows[mine] >= part["rows"]]
            if len(bad):
                raise KeyError(f"segment id {int(ids[bad[0]])} (part ordinal {int(o)}, row {int(rows[bad[0]])}) "
                               f"is not in bank {self.uri} version {self.version}")
        return ordinals, rows

    def _rows(self, segment_ids: np.ndarray | list[int], columns: list[str]) -> pa.Table:
        """`columns` of the rows of `segment_ids`, in their order; reads only the row groups holding them."""
        ids = np.asarray(segment_ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return store.part_schema(self.dims["visual"], self.dims["text"]).empty_table().select(columns)
        ordinals, rows = self._locate(ids)
        tables, positions = [], []
        for o in np.unique(ordinals):
            mine = np.flatnonzero(ordinals == o)
            tables.append(self._read_part(self._parts[int(o)]["name"], rows[mine], columns))
            positions.append(mine)
        table = pa.concat_tables(tables).take(np.argsort(np.concatenate(positions), kind="stable"))
        found = table["segment_id"].to_numpy()
        if not np.array_equal(found, ids):
            bad = int(np.flatnonzero(found != ids)[0])
            raise BankMismatchError(f"bank {self.uri}: the row of segment id {int(ids[bad])} holds id "
                                    f"{int(found[bad])}; its part does not match the manifest")
        return table

    def _label_codes(self, ordinal: int) -> np.ndarray:
        """(rows,) int32 index into self._vocabulary of each row's label (-1: none) of one part, loaded once."""
        with self._lock:
            codes = self._labels.get(ordinal)
        if codes is not None:
            return codes
        name = self._parts[ordinal]["name"]
        fs, path = storage.url_to_fs(store.part_url(self.uri, name), self.storage_options)
        with fs.open(path, "rb", cache_type="none") as f:
            column = pq.ParquetFile(f, metadata=self._footer(name), pre_buffer=True).read(columns=["label"])["label"]
        encoded = column.combine_chunks().dictionary_encode()
        part_codes = encoded.indices.fill_null(-1).to_numpy().astype(np.int32)
        with self._lock:
            if ordinal not in self._labels:
                words = encoded.dictionary.to_pylist()
                for w in words:
                    self._vocabulary_index.setdefault(w, len(self._vocabulary_index))
                self._vocabulary = list(self._vocabulary_index)
                to_global = np.array([self._vocabulary_index[w] for w in words] + [-1], np.int32)
                self._labels[ordinal] = to_global[part_codes]  # -1 indexes the appended -1
                self._counts["label_parts_loaded"] += 1
            return self._labels[ordinal]

    def _read_part(self, name: str, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """`columns` at `rows` (in that order) of part `name`: one read of just the row groups holding them."""
        footer = self._footer(name)
        starts = np.cumsum([0] + [footer.row_group(i).num_rows for i in range(footer.num_row_groups)])
        group = np.searchsorted(starts, rows, side="right") - 1
        wanted = np.unique(group)
        # Position of each wanted group's first row inside the concatenation read_row_groups returns.
        base = np.cumsum(np.concatenate([[0], starts[wanted + 1] - starts[wanted]]))[:-1]
        local = base[np.searchsorted(wanted, group)] + rows - starts[group]
        fs, path = storage.url_to_fs(store.part_url(self.uri, name), self.storage_options)
        # No read-ahead cache: an object-store file would otherwise fetch whole blocks (5 MB) past each read.
        with fs.open(path, "rb", cache_type="none") as f:
            table = pq.ParquetFile(f, metadata=footer, pre_buffer=True).read_row_groups(
                [int(g) for g in wanted], columns=columns)
        with self._lock:
            self._counts["row_groups_read"] += len(wanted)
        return table.take(local)

    def _footer(self, name: str) -> pq.FileMetaData:
        """The part's Parquet footer (row-group sizes), read once per part and kept."""
        with self._lock:
            footer = self._footers.get(name)
        if footer is not None:
            return footer
        fs, path = storage.url_to_fs(store.part_url(self.uri, name), self.storage_options)
        with fs.open(path, "rb", cache_type="none") as f:
            footer = pq.read_metadata(f)
        with self._lock:
            self._counts["footers_read"] += 1
            return self._footers.setdefault(name, footer)
