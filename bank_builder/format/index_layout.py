"""The objects of a bank's index, under <bank>/index/<index-id>/ (names relative to that folder):

  trained.faissindex  the trained, empty index: coarse quantizer + codebooks (plain faiss: faiss.read_index)
  directory.npy       one row per inverted list (numpy structured array, np.load(allow_pickle=False)):
                        object int32    the list object holding the list
                        offset int64    byte offset of the list in that object
                        bytes  int64    byte length of the list
                        count  int64    vectors in the list
                        checksum uint64[2]  the first 16 bytes of the list's sha256 (also its content address)
  lists/<n>.bin       list objects: inverted lists stored contiguously in list-number order, no header.
                      One list of `count` vectors is, little-endian, back to back:
                        ids      int64[count]              segment ids (part ordinal << 32 | row)
                        codes    uint8[count, code_size]   the faiss codes (IVF-Flat: the float32 bytes)
                        vectors  float16[count, dim]       only when the index stores refine vectors
  text.npz            the label table: labels, their text embeddings, sums of their visual embeddings, counts
  report.json         parameters, sizes, stage timings, recall / latency curves
  staging/<part>.bin  per-part add output of a build in progress (deleted once published)
  deltas/<delta>/     vectors added later with the same quantizer: directory.npy + lists/<n>.bin, laid out as
                      above; a list's content is the base's entries, then each delta's in order
  text-<token>.npz    the label table of a later version (after a delta or a removal)

A reader loads trained.faissindex and directory.npy once, then fetches exactly the lists it needs by byte
range; every list is checked against its checksum before use. Nothing here is a pickle.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from bank_builder.format import storage
from bank_builder.format.errors import IndexCorruptError
from bank_builder.format.manifest import DeltaEntry, IndexEntry, ObjectEntry
from bank_builder.format.ref import BankRef

TRAINED_OBJECT = "trained.faissindex"
DIRECTORY_OBJECT = "directory.npy"
TEXT_OBJECT = "text.npz"
REPORT_OBJECT = "report.json"
DIRECTORY_DTYPE = np.dtype([("object", "<i4"), ("offset", "<i8"), ("bytes", "<i8"), ("count", "<i8"),
                            ("checksum", "<u8", (2,))])
MAX_GAP = 16 << 10  # neighbouring ranges of one object closer than this are fetched as one request

# np.load parses each .npy header with ast.literal_eval, whose AST recursion counter CPython 3.11/3.12 shares
# between threads (python/cpython gh-106905): concurrent parses fail at random with "AST constructor recursion
# depth mismatch". The query service parses from many threads, so header parsing is serialised here.
_NPY_PARSE_LOCK = threading.Lock()


def new_index_id() -> str:
    """A fresh, never-reused index id (UTC time + random suffix): objects of a published index never change."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def index_url(ref: BankRef, index_id: str, *names: str) -> str:
    """URL of the index folder, or of an object in it."""
    return ref.url("index", index_id, *names)


def list_object(n: int) -> str:
    """Object name of list object n."""
    return f"lists/{n:06d}.bin"


def staging_object(part: str) -> str:
    """Object name of a part's intermediate add output."""
    return f"staging/{part}.bin"


def sha256(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def list_checksum(data: bytes | memoryview) -> np.ndarray:
    """(2,) uint64: the first 16 bytes of one list's sha256 (hardware-accelerated on common CPUs; also names the
    list's content in caches)."""
    return np.frombuffer(hashlib.sha256(data).digest()[:16], "<u8").copy()


@dataclass(frozen=True)
class ListLayout:
    """How one inverted list is laid out in a list object (see the module docstring)."""

    code_size: int
    dim: int
    refine: bool

    @property
    def row_bytes(self) -> int:
        """Bytes per stored vector: id + code (+ float16 vector)."""
        return 8 + self.code_size + (2 * self.dim if self.refine else 0)

    def encode(self, ids: np.ndarray, codes: np.ndarray, vectors: np.ndarray | None) -> bytes:
        """One list's bytes from ids (n,) int64, codes (n, code_size) uint8, vectors (n, dim) float16."""
        parts = [np.ascontiguousarray(ids, "<i8").tobytes(), np.ascontiguousarray(codes, np.uint8).tobytes()]
        if self.refine:
            parts.append(np.ascontiguousarray(vectors, "<f2").tobytes())
        return b"".join(parts)

    def decode(self, data: bytes | memoryview, count: int) -> ListArrays:
        """The arrays of one list of `count` vectors from its bytes (views, no copy)."""
        if len(data) != count * self.row_bytes:
            raise IndexCorruptError(f"a list of {count} vectors takes {count * self.row_bytes} bytes, got {len(data)}")
        ids = np.frombuffer(data, "<i8", count)
        codes = np.frombuffer(data, np.uint8, count * self.code_size, 8 * count).reshape(count, self.code_size)
        vectors = None
        if self.refine:
            start = count * (8 + self.code_size)
            vectors = np.frombuffer(data, "<f2", count * self.dim, start).reshape(count, self.dim)
        return ListArrays(ids, codes, vectors)


@dataclass
class ListArrays:
    """One inverted list: segment ids (n,) int64, codes (n, code_size) uint8, vectors (n, dim) float16 or None."""

    ids: np.ndarray
    codes: np.ndarray
    vectors: np.ndarray | None = None


def write_object(ref: BankRef, index_id: str, name: str, data: bytes) -> ObjectEntry:
    """Write `data` as `name` under the index folder; returns its entry {object, bytes, sha256}."""
    storage.write_bytes(index_url(ref, index_id, name), data, ref.storage_options)
    return ObjectEntry(name, len(data), sha256(data))


def read_object(ref: BankRef, index_id: str, entry: ObjectEntry, verify: bool = True) -> bytes:
    """The bytes of a manifest-listed object, checked against its recorded sha256."""
    url = index_url(ref, index_id, entry.object)
    data = storage.read_bytes(url, ref.storage_options)
    if verify and sha256(data) != entry.sha256:
        raise IndexCorruptError(f"{url} does not match the checksum in the manifest (object changed or "
                                "truncated); rebuild the index with `refbank index`")
    return data


def directory_bytes(directory: np.ndarray) -> bytes:
    """directory.npy bytes of a DIRECTORY_DTYPE array."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(directory, DIRECTORY_DTYPE), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class ListSource:
    """One set of list objects with its directory: an index's base, or one of its deltas."""

    name: str  # "base" or the delta's id
    directory: ObjectEntry
    lists: list[ObjectEntry]
    vectors: int


def list_sources(entry: IndexEntry) -> list[ListSource]:
    """The base, then each delta in order: a list's entries are theirs, concatenated in this order."""
    base_vectors = entry.vectors - sum(d.vectors for d in entry.deltas)
    return [ListSource("base", entry.directory, entry.lists, base_vectors)] + [
        ListSource(d.id, d.directory, d.lists, d.vectors) for d in entry.deltas]


def delta_folder(delta_id: str) -> str:
    """A delta's folder, relative to its index folder."""
    return f"deltas/{delta_id}"


def read_directory(ref: BankRef, entry: IndexEntry, source: ListSource | None = None,
                   verify: bool = True) -> np.ndarray:
    """A list directory (nlist,) DIRECTORY_DTYPE of the index's base (or of `source`), checked against the
    manifest: one row per list, objects that exist, ranges inside their object, the layout's bytes per vector."""
    source = source or list_sources(entry)[0]
    data = read_object(ref, entry.id, source.directory, verify)
    what = f"the {source.name} directory of index {entry.id}"
    try:
        with _NPY_PARSE_LOCK:
            directory = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise IndexCorruptError(f"{what} cannot be read ({exc})") from None
    layout = ListLayout(entry.code_size, entry.dim, entry.refine)
    sizes = np.array([o.bytes for o in source.lists], np.int64)
    if directory.dtype != DIRECTORY_DTYPE or directory.shape != (entry.nlist,):
        raise IndexCorruptError(f"{what} has {directory.dtype} {directory.shape}, expected {entry.nlist} rows of "
                                f"{DIRECTORY_DTYPE}")
    obj = directory["object"]
    bad = (obj < 0) | (obj >= len(sizes)) | (directory["offset"] < 0) | (directory["count"] < 0)
    bad |= directory["bytes"] != directory["count"] * layout.row_bytes
    bad |= ~bad & (directory["offset"] + directory["bytes"] > sizes[np.clip(obj, 0, max(len(sizes) - 1, 0))])
    if bad.any() or int(directory["count"].sum()) != source.vectors:
        raise IndexCorruptError(f"{what} does not match its objects (first bad list: "
                                f"{int(np.flatnonzero(bad)[0]) if bad.any() else 'counts'}); rebuild the index")
    return directory


@dataclass
class Fetched:
    """Bytes of fetched lists by list number, with what the fetch cost: requests and bytes read."""

    lists: dict[int, bytes]
    requests: int
    bytes_read: int


def fetch_lists(ref: BankRef, entry: IndexEntry, directory: np.ndarray, lists: list[int],
                max_gap: int = MAX_GAP, source: ListSource | None = None) -> Fetched:
    """The bytes of `lists` of the index's base (or of `source`, whose `directory` this is), each checked
    against its checksum: ranged reads of their list objects, ranges of one object closer than `max_gap` merged
    into one request, all requests issued together (concurrently where the store allows: s3fs).
    IndexCorruptError naming the list and object when a list's bytes changed."""
    objects = (source or list_sources(entry)[0]).lists
    rows = sorted({int(l) for l in lists if directory["bytes"][l] > 0},
                  key=lambda l: (int(directory["object"][l]), int(directory["offset"][l])))
    spans: list[list] = []  # [object, start, end, [lists]]
    for l in rows:
        o, start = int(directory["object"][l]), int(directory["offset"][l])
        end = start + int(directory["bytes"][l])
        if spans and spans[-1][0] == o and start - spans[-1][2] <= max_gap:
            spans[-1][2] = max(spans[-1][2], end)
            spans[-1][3].append(l)
        else:
            spans.append([o, start, end, [l]])
    urls = [ref.url("index", entry.id, objects[o].object) for o, _, _, _ in spans]
    blobs = storage.read_ranges(urls, [s[1] for s in spans], [s[2] for s in spans], ref.storage_options)
    out = {int(l): b"" for l in lists if directory["bytes"][l] == 0}
    for (o, start, _, members), blob in zip(spans, blobs):
        view = memoryview(blob)
        for l in members:
            begin = int(directory["offset"][l]) - start
            data = view[begin:begin + int(directory["bytes"][l])]
            if len(data) != int(directory["bytes"][l]) or not np.array_equal(list_checksum(data),
                                                                              directory["checksum"][l]):
                raise IndexCorruptError(f"list {l} in {objects[o].object} of index {entry.id} does not match "
                                        "its checksum (the object changed or was truncated); rebuild the index "
                                        "with `refbank index`")
            out[l] = bytes(data)
    return Fetched(out, len(spans), sum(len(b) for b in blobs))


# ----------------------------------------------------------------------------------------- label table


@dataclass
class LabelTable:
    """Every distinct label of a version (text.npz): labels (L,) sorted; text (L, D) float32 text embeddings;
    sums (L, C) float64, the sum of each label's visual embeddings; counts (L,) segments. Its prototypes are
    the sums L2-normalised (each label's mean visual embedding); sums make the table updatable when segments
    are added or removed."""

    labels: list[str]
    text: np.ndarray
    sums: np.ndarray
    counts: np.ndarray

    @cached_property
    def prototypes(self) -> np.ndarray:
        """(L, C) float32 mean visual embedding of each label, L2-normalised."""
        norms = np.maximum(np.linalg.norm(self.sums, axis=1, keepdims=True), 1e-12)
        return (self.sums / norms).astype(np.float32)

    def to_bytes(self) -> bytes:
        """text.npz bytes (float16 text embeddings, as stored in the parts)."""
        buf = io.BytesIO()
        np.savez(buf, labels=np.array(self.labels, dtype=str), embeddings=self.text.astype(np.float16),
                 sums=np.asarray(self.sums, np.float64), counts=np.asarray(self.counts, np.int64))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LabelTable:
        """Parse text.npz bytes (IndexCorruptError when a field is missing or shapes disagree)."""
        try:
            with _NPY_PARSE_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except ValueError as exc:
            raise IndexCorruptError(f"the label table cannot be read ({exc})") from None
        missing = {"labels", "embeddings", "sums", "counts"} - set(arrays)
        if missing:
            raise IndexCorruptError(f"the label table lacks {sorted(missing)}; rebuild the index with `refbank index`")
        labels = [str(s) for s in arrays["labels"]]
        text, sums = arrays["embeddings"].astype(np.float32), arrays["sums"].astype(np.float64)
        if not len(text) == len(sums) == len(arrays["counts"]) == len(labels):
            raise IndexCorruptError("the label table's arrays have different lengths; rebuild the index")
        return cls(labels, text, sums, arrays["counts"].astype(np.int64))

    def merged(self, labels: dict[str, np.ndarray], sums: dict[str, np.ndarray], counts: dict[str, int],
               sign: int = 1) -> LabelTable:
        """This table with segments added (sign 1) or removed (sign -1): per label, a text embedding (kept from
        this table when it has the label), the sum of their visual embeddings and their count. A label whose
        count falls to zero leaves the table."""
        text = dict(zip(self.labels, self.text))
        total = {n: self.sums[i].copy() for i, n in enumerate(self.labels)}
        count = dict(zip(self.labels, self.counts.tolist()))
        for name in counts:
            text.setdefault(name, labels.get(name))
            total[name] = total.get(name, 0.0) + sign * np.asarray(sums[name], np.float64)
            count[name] = count.get(name, 0) + sign * int(counts[name])
        names = sorted(n for n in count if count[n] > 0 and text.get(n) is not None)
        dim = self.sums.shape[1] if len(self.sums) else len(next(iter(sums.values())))
        return LabelTable(names, np.array([text[n] for n in names], np.float32).reshape(len(names), -1),
                          np.array([total[n] for n in names], np.float64).reshape(len(names), dim),
                          np.array([count[n] for n in names], np.int64))


def read_label_table(ref: BankRef, entry: IndexEntry, verify: bool = True) -> LabelTable | None:
    """The label table of an index, or None when the bank has no labelled segment with a text embedding."""
    if entry.text is None:
        return None
    return LabelTable.from_bytes(read_object(ref, entry.id, entry.text, verify))


def remove_tree(url: str, storage_options: dict[str, Any] | None) -> None:
    """Delete a folder and everything under it (no error when it is already gone)."""
    storage.remove_tree(url, storage_options)
