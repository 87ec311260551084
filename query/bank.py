"""Open one bank version for serving: the manifest, the encoder check, and per-segment reads by id.

A segment id is `part ordinal << 32 | row` (bank_builder.format.parts), so a lookup goes straight to the row
groups that hold the rows: the part's Parquet footer says where each row group starts, and only those row
groups, and only the columns asked for, are read.

Caches, so that a query costs at most one storage request per cache miss (on S3 every request is a round
trip): footers are kept for good (one request each, the first time a part is touched); decoded row groups
are kept least-recently-used under `cache_bytes` (one ranged request per missing row group, requests of one
lookup issued together); each part's label column is loaded once (one request per row group). Concurrent
lookups that miss the same entry wait for one fetch.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bank_builder.encoders.base import EncoderSpec
from bank_builder.format import BankMismatchError, BankRef, IndexCorruptError, IndexEntry, Manifest, PartEntry
from bank_builder.format import current_version, list_versions, no_version_error, parts as part_io, read_manifest
from bank_builder.format.index_layout import LabelTable, read_label_table
from bank_builder.format.parts import matrix
from bank_builder.format.tombstones import is_removed, read_removed

log = logging.getLogger("refbank.query")

VISUAL = "visual_embedding"
# What `Bank.metadata` returns per segment: everything but the embeddings (the bulk of a row).
METADATA_COLUMNS = ["segment_id", "part", "image_key", "segment_index", "label", "label_source", "bbox", "area",
                    "mask", "mask_kind", "quality"]
DEFAULT_CACHE_BYTES = 64 << 20  # decoded row groups kept by a Bank (metadata of ~100 row groups of 4096 rows)
# The fields that identify an encoder; `entry` (the recipe to rebuild it, absent in older banks) and `note` (what
# the entry says the model is) describe it and are not compared.
SPEC_FIELDS = [f.name for f in fields(EncoderSpec) if f.name not in ("entry", "note")]


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


def open_bank(uri: str | BankRef, version: str | None = None, storage_options: dict[str, Any] | None = None,
              expected_encoder: EncoderSpec | dict[str, Any] | None = None,
              cache_bytes: int = DEFAULT_CACHE_BYTES) -> Bank:
    """The bank at `uri`, at `version` (default: CURRENT), checked against the encoder that will query it.

    Raises BankMismatchError when the bank has no such version (the message lists those it has) or when
    `expected_encoder` differs from the encoder spec the bank records (the message names each differing field
    with both values); BankFormatError when its format or index format is not the one this refbank reads, or
    when its manifest is malformed or names objects outside the bank. cache_bytes: see `Bank`."""
    ref = uri if isinstance(uri, BankRef) else BankRef(uri, storage_options or {})
    versions = list_versions(ref)
    current = current_version(ref)
    version = version or current
    if version is None:
        raise no_version_error(ref)
    if version not in versions:
        raise BankMismatchError(f"bank {ref} has no version {version!r}; available: {', '.join(versions) or 'none'}"
                                f" (CURRENT: {current})")
    m = read_manifest(ref, version)  # raises on a format this refbank cannot read
    if expected_encoder is not None:
        diff = encoder_differences(m.encoder, expected_encoder)
        if diff:
            detail = "; ".join(f"{k}: bank has {a!r}, encoder has {b!r}" for k, (a, b) in diff.items())
            raise BankMismatchError(f"bank {ref} version {version} was built with another encoder ({detail}). "
                                    "Query it with the encoder it records, or rebuild the bank with this one.")
    return Bank(ref, m, versions, cache_bytes)


class _Cache:
    """Values by key, loaded on a miss by one caller while concurrent callers of the same key wait for that
    load (one fetch per miss), kept least-recently-used under a byte budget (None: kept for good)."""

    def __init__(self, budget: int | None, weigh: Callable[[Any], int] = lambda value: 0) -> None:
        self.budget, self.weigh = budget, weigh
        self.hits = self.misses = self.bytes = 0
        self._values: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._loading: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()

    def get_many(self, keys: list[Hashable], load: Callable[[list[Hashable]], list[Any]]) -> list[Any]:
        """The value of each key, in order; `load(missing)` returns the values of the missing keys, in order."""
        found: dict[Hashable, Any] = {}
        while len(found) < len(set(keys)):
            mine, waits = [], []
            with self._lock:
                for key in dict.fromkeys(k for k in keys if k not in found):
                    if key in self._values:
                        self._values.move_to_end(key)
                        found[key] = self._values[key][0]
                        self.hits += 1
                    elif key in self._loading:
                        waits.append(self._loading[key])
                    else:
                        self._loading[key] = threading.Event()
                        mine.append(key)
                self.misses += len(mine)
            try:
                if mine:
                    found.update(zip(mine, load(mine)))
                    with self._lock:
                        for key in mine:
                            self._put(key, found[key])
            finally:
                with self._lock:
                    for key in mine:
                        self._loading.pop(key).set()
            for event in waits:
                event.wait()  # then the next round finds the value, or loads it if that load failed
        return [found[k] for k in keys]

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The value of one key, loaded by `load()` on a miss."""
        return self.get_many([key], lambda missing: [load()])[0]

    def _put(self, key: Hashable, value: Any) -> None:
        size = self.weigh(value)
        self._values[key] = (value, size)
        self.bytes += size
        while self.budget is not None and self.bytes > self.budget and len(self._values) > 1:
            self.bytes -= self._values.popitem(last=False)[1][1]


class Bank:
    """One opened bank version: its manifest, and reads of segment rows by id (thread-safe).

    Build with `open_bank`. `versions` lists the versions on storage when it was opened; `cache_bytes` bounds the
    decoded row groups kept (least recently used go first; see the module docstring for the other caches)."""

    def __init__(self, ref: BankRef, manifest: Manifest, versions: list[str],
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.ref, self.manifest, self.versions = ref, manifest, versions
        self.uri, self.storage_options = ref.uri, ref.storage_options
        self.version: str = manifest.version
        self._parts = manifest.part_by_ordinal
        self.removed = read_removed(ref, manifest)  # sorted ids its tombstones hide from searches and lookups
        self._footers = _Cache(None)  # part name → Parquet footer
        self._groups = _Cache(cache_bytes, lambda table: table.nbytes)  # (part, group, columns) → table
        self._label_loads = _Cache(None)  # part ordinal → label code per row (see `labels`)
        self._lock = threading.Lock()
        self._vocabulary_index: dict[str, int] = {}
        self._vocabulary: list[str] = []

    @property
    def spec(self) -> EncoderSpec:
        """The encoder spec the bank was built with."""
        recorded = self.manifest.encoder
        missing = [f for f in SPEC_FIELDS if f not in recorded]
        if missing:
            raise BankMismatchError(f"bank {self.uri} version {self.version} records an incomplete encoder spec "
                                    f"(missing {', '.join(missing)}); it was not built by `refbank build`")
        return EncoderSpec.from_dict({f: recorded[f] for f in [*SPEC_FIELDS, "note"] if f in recorded})

    @property
    def dims(self) -> dict[str, int | None]:
        """{"visual": C, "text": D or None}: widths of the stored embeddings."""
        return dict(self.manifest.dims)

    @property
    def index(self) -> IndexEntry | None:
        """The manifest's index entry (list objects, directory, trained index, nprobe), or None before
        `refbank index`."""
        return self.manifest.index

    def label_table(self) -> LabelTable:
        """The label table of this version (vocabulary mode); BankMismatchError when there is none."""
        table = read_label_table(self.ref, self.index) if self.index else None
        if table is None:
            raise BankMismatchError(f"bank {self.uri} version {self.version} has no label table (no index, or no "
                                    "segment with a label text); run `refbank index` on a bank with labels")
        return table

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
        visual_embeddings (cache misses, one request each) and served from the cache, the cache's bytes, parts
        whose label column `labels` has loaded."""
        return {"footers_read": self._footers.misses, "row_groups_read": self._groups.misses,
                "row_group_hits": self._groups.hits, "row_group_cache_bytes": self._groups.bytes,
                "label_parts_loaded": self._label_loads.misses}

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part ordinal, row) of each id; KeyError naming the first id that is not in this version."""
        gone = is_removed(self.removed, ids)
        if gone.any():
            raise KeyError(f"segment id {int(ids[gone][0])} was removed from bank {self.uri} (version "
                           f"{self.version} holds a tombstone for it)")
        ordinals, rows = ids >> part_io.ROW_BITS, ids & ((1 << part_io.ROW_BITS) - 1)
        for o in np.unique(ordinals):
            part = self._parts.get(int(o))
            mine = np.flatnonzero(ordinals == o)
            bad = mine if part is None else mine[rows[mine] >= part.rows]
            if len(bad):
                raise KeyError(f"segment id {int(ids[bad[0]])} (part ordinal {int(o)}, row {int(rows[bad[0]])}) "
                               f"is not in bank {self.uri} version {self.version}")
        return ordinals, rows

    def _rows(self, segment_ids: np.ndarray | list[int], columns: list[str]) -> pa.Table:
        """`columns` of the rows of `segment_ids`, in their order; reads only the row groups holding them."""
        ids = np.asarray(segment_ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return part_io.part_schema(self.dims["visual"], self.dims["text"]).empty_table().select(columns)
        ordinals, rows = self._locate(ids)
        tables, positions = [], []
        for o in np.unique(ordinals):
            mine = np.flatnonzero(ordinals == o)
            tables.append(self._read_part(self._parts[int(o)], rows[mine], columns))
            positions.append(mine)
        table = pa.concat_tables(tables).take(np.argsort(np.concatenate(positions), kind="stable"))
        found = table["segment_id"].to_numpy()
        if not np.array_equal(found, ids):
            bad = int(np.flatnonzero(found != ids)[0])
            raise IndexCorruptError(f"bank {self.uri}: the row of segment id {int(ids[bad])} holds id "
                                    f"{int(found[bad])}; its part does not match the manifest")
        return table

    def _label_codes(self, ordinal: int) -> np.ndarray:
        """(rows,) int32 index into self._vocabulary of each row's label (-1: none) of one part, loaded once."""
        return self._label_loads.get(ordinal, lambda: self._load_labels(self._parts[ordinal]))

    def _load_labels(self, part: PartEntry) -> np.ndarray:
        """Read a part's label column (one request per row group) and code it against the bank vocabulary."""
        footer = self._footer(part)
        tables = part_io.read_groups(self.ref, part, footer, list(range(footer.num_row_groups)), ["label"])
        encoded = pa.concat_tables(tables)["label"].combine_chunks().dictionary_encode()
        part_codes = encoded.indices.fill_null(-1).to_numpy().astype(np.int32)
        with self._lock:
            words = encoded.dictionary.to_pylist()
            for w in words:
                self._vocabulary_index.setdefault(w, len(self._vocabulary_index))
            self._vocabulary = list(self._vocabulary_index)
            to_global = np.array([self._vocabulary_index[w] for w in words] + [-1], np.int32)
        return to_global[part_codes]  # -1 indexes the appended -1

    def _read_part(self, part: PartEntry, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """`columns` at `rows` (in that order) of `part`: its row groups holding them, from the cache or read."""
        footer = self._footer(part)
        starts = np.cumsum([0] + [footer.row_group(i).num_rows for i in range(footer.num_row_groups)])
        group = np.searchsorted(starts, rows, side="right") - 1
        wanted = np.unique(group)
        # Position of each wanted group's first row inside the concatenation of the wanted groups.
        base = np.cumsum(np.concatenate([[0], starts[wanted + 1] - starts[wanted]]))[:-1]
        local = base[np.searchsorted(wanted, group)] + rows - starts[group]
        keys = [(part.name, int(g), tuple(columns)) for g in wanted]
        tables = self._groups.get_many(keys, lambda missing: part_io.read_groups(
            self.ref, part, footer, [key[1] for key in missing], columns))
        return pa.concat_tables(tables).take(local)

    def _footer(self, part: PartEntry) -> pq.FileMetaData:
        """The part's Parquet footer (row-group sizes), read once per part and kept."""
        return self._footers.get(part.name, lambda: part_io.read_footer(self.ref, part))
