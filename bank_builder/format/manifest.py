"""The manifest of a bank version as typed values: parts, the index, object entries; parsed and checked.

A manifest (`versions/<v>/manifest.json`) is immutable once published. `Manifest.from_dict` refuses one that
misses a field, holds a wrong type, or names an object outside the bank (`ref.check_name`), naming what is
wrong, so a reader never acts on half a manifest.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, TypeVar

from bank_builder.format.errors import BankFormatError
from bank_builder.format.ref import check_name

FORMAT_VERSION = 2  # 2: parts named by shard + ordinal + fingerprint, list-addressable index objects
INDEX_FORMAT = 2

T = TypeVar("T")


def _typed(cls: type[T], data: Any, where: str, nested: dict[str, Any] | None = None) -> T:
    """`cls(**data)` after checking that `data` is an object holding every field of `cls` with a plausible
    type; fields named in `nested` are parsed by the given function first. Unknown keys are ignored."""
    if not isinstance(data, dict):
        raise BankFormatError(f"{where} must be a JSON object, got {type(data).__name__}")
    values = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is not MISSING or f.default_factory is not MISSING:
                continue
            raise BankFormatError(f"{where} has no {f.name!r}")
        value = data[f.name]
        if nested and f.name in nested and value is not None:
            value = nested[f.name](value, f"{where}.{f.name}")
        values[f.name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise BankFormatError(f"{where}: {exc}") from None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ObjectEntry:
    """One object a manifest names: its name relative to its folder, size in bytes, and sha256 (hex)."""

    object: str
    bytes: int
    sha256: str

    def __post_init__(self) -> None:
        check_name(self.object)
        _check(_is_int(self.bytes) and self.bytes >= 0, f"bytes must be a count, got {self.bytes!r}")
        _check(isinstance(self.sha256, str) and len(self.sha256) == 64, f"sha256 must be 64 hex, got {self.sha256!r}")

    @classmethod
    def parse(cls, data: Any, where: str) -> ObjectEntry:
        """An entry from its JSON form; BankFormatError saying what is wrong."""
        return _typed(cls, data, where)


@dataclass
class PartEntry:
    """What the manifest records about one committed part (also the part's commit marker)."""

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
    paired: int = 0  # of them, labelled by pairing with a caption phrase (label_source "paired")
    # segments their masks left without a label (the paired ones included), by the mask kind that cut them
    unlabelled_by_kind: dict[str, int] = field(default_factory=dict)
    footer_sha256: str = ""  # of the Parquet footer + 8-byte trailer, checked on every footer read ("" = older part)

    def __post_init__(self) -> None:
        check_name(self.name)
        for key in ("ordinal", "rows", "bytes", "samples", "rejects"):
            _check(_is_int(getattr(self, key)) and getattr(self, key) >= 0, f"{key} must be a count")
        _check(isinstance(self.reject_reasons, dict), "reject_reasons must be an object")

    @classmethod
    def parse(cls, data: Any, where: str) -> PartEntry:
        """A part entry from its JSON form; BankFormatError saying what is wrong."""
        return _typed(cls, data, where)


@dataclass(frozen=True)
class DeltaEntry:
    """Vectors added to an index after it was built, with its trained quantizer: list objects and a directory
    of their own under `index/<id>/deltas/<delta id>/` (names relative to the index folder), laid out as the
    base's. A list's content is the base's entries, then each delta's in order."""

    id: str
    directory: ObjectEntry
    lists: list[ObjectEntry]
    vectors: int
    parts: list[str]
    coarse_score_mean: float  # mean inner product of its vectors with their nearest centroid (drift)
    created_at: str

    def __post_init__(self) -> None:
        check_name(self.id)
        _check(_is_int(self.vectors) and self.vectors >= 0, "vectors must be a count")

    @classmethod
    def parse(cls, data: Any, where: str) -> DeltaEntry:
        """A delta entry from its JSON form; BankFormatError saying what is wrong."""
        return _typed(cls, data, where, {"directory": ObjectEntry.parse, "lists": _parse_list(ObjectEntry.parse)})


@dataclass(frozen=True)
class TombstoneEntry:
    """Segments a version hides from every search and metadata lookup: a sorted int64 array of segment ids
    (`tombstones/<name>.npy`, np.load(allow_pickle=False)), with why and when."""

    object: str
    bytes: int
    sha256: str
    count: int
    reason: str
    created_at: str

    def __post_init__(self) -> None:
        check_name(self.object)
        _check(_is_int(self.count) and self.count >= 0, "count must be a count")

    @classmethod
    def parse(cls, data: Any, where: str) -> TombstoneEntry:
        """A tombstone entry from its JSON form; BankFormatError saying what is wrong."""
        return _typed(cls, data, where)


@dataclass(frozen=True)
class CuratedPart:
    """A part's curation decisions: `object` (relative to the bank, `curation/<part>-<sha256[:16]>.parquet`, one
    row per part row in row order: segment_id, keep, reason, score), its size and sha256, and its kept rows."""

    part: str
    object: str
    bytes: int
    sha256: str
    rows: int
    kept: int

    def __post_init__(self) -> None:
        check_name(self.part)
        check_name(self.object)
        for key in ("bytes", "rows", "kept"):
            _check(_is_int(getattr(self, key)) and getattr(self, key) >= 0, f"{key} must be a count")

    @classmethod
    def parse(cls, data: Any, where: str) -> CuratedPart:
        """A curated part from its JSON form; BankFormatError saying what is wrong."""
        return _typed(cls, data, where)


@dataclass(frozen=True)
class CurationEntry:
    """A version's curation (bank_builder.curate): the options it ran with, one decisions object per part it
    covered, and its per-label report object (`curation/report-<sha256[:16]>.json`). Parts it does not list
    (added by a build since) are uncurated: every row counts as kept."""

    options: dict[str, Any]
    parts: list[CuratedPart]
    report: ObjectEntry
    kept: int
    dropped: int
    dropped_by_reason: dict[str, int]
    created_at: str

    @classmethod
    def parse(cls, data: Any, where: str) -> CurationEntry:
        """A curation entry from its JSON form; BankFormatError saying what is wrong."""
        return _typed(cls, data, where, {"parts": _parse_list(CuratedPart.parse), "report": ObjectEntry.parse})

    @property
    def by_part(self) -> dict[str, CuratedPart]:
        """Curated parts keyed by part name."""
        return {c.part: c for c in self.parts}


@dataclass(frozen=True)
class IndexEntry:
    """The index of a version: objects under `index/<id>/`, parameters, and the autotune's choice.

    lists: the list objects in object-number order; directory: the per-list table (object, offset, bytes,
    count, checksum) a reader loads once; text: the label table (None when no segment has a label text);
    deltas: vectors added later with the same quantizer (base + deltas = the index's lists); vectors: base and
    deltas together; parts: the parts the base and every delta hold."""

    format: int
    id: str
    factory: str
    kind: str
    metric: str
    dim: int
    vectors: int
    nlist: int
    code_size: int
    trained: ObjectEntry
    directory: ObjectEntry
    lists: list[ObjectEntry]
    refine: bool
    refine_factor: int
    nprobe: int
    k: int
    recall_at_k: float
    target_recall: float
    target_met: bool
    text: ObjectEntry | None
    labels: int
    report: str
    parts: list[str]
    config: dict[str, Any]
    created_at: str
    coarse_score_mean: float = 0.0  # of the base's vectors: what a delta's drift is measured against
    deltas: list[DeltaEntry] = field(default_factory=list)
    folded_tombstones: list[str] = field(default_factory=list)  # tombstone objects compaction applied to the lists
    # part name → the curation object whose kept rows it holds (parts absent here: all rows); an index whose
    # parts were curated again since holds other rows than the version's curation says, and is rebuilt
    curation: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.id)
        check_name(self.report)
        for key in ("dim", "vectors", "nlist", "code_size", "nprobe", "k", "labels", "refine_factor"):
            _check(_is_int(getattr(self, key)) and getattr(self, key) >= 0, f"{key} must be a count")
        _check(self.nlist >= 1 and self.nprobe >= 1, "nlist and nprobe must be >= 1")

    @classmethod
    def parse(cls, data: Any, where: str) -> IndexEntry:
        """An index entry from its JSON form; BankFormatError saying what is wrong (an older format says so)."""
        _check_format(data, "format", INDEX_FORMAT, f"{where} has index format", "Rebuild the index with "
                      "`refbank index`.")
        return _typed(cls, data, where, {"trained": ObjectEntry.parse, "directory": ObjectEntry.parse,
                                         "text": ObjectEntry.parse, "lists": _parse_list(ObjectEntry.parse),
                                         "deltas": _parse_list(DeltaEntry.parse)})

    def with_(self, **changes: Any) -> IndexEntry:
        """A copy with `changes` applied."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _parse_list(parse: Any) -> Any:
    """A parser of a JSON list whose items `parse` reads (each told where it is)."""

    def parse_all(value: Any, where: str) -> list:
        if not isinstance(value, list):
            raise BankFormatError(f"{where} must be a list")
        return [parse(item, f"{where}[{i}]") for i, item in enumerate(value)]

    return parse_all


def _check_format(data: Any, key: str, expected: int, what: str, fix: str) -> None:
    """BankFormatError when `data[key]` is not the format version this refbank reads."""
    if isinstance(data, dict) and data.get(key) != expected:
        raise BankFormatError(f"{what} {data.get(key)}; this refbank reads {expected}. {fix}")


@dataclass(frozen=True)
class Manifest:
    """One bank version: format, encoder spec, dims, build fingerprint and options, parts, totals, index."""

    format_version: int
    version: str | None
    parent: str | None
    created_at: str
    encoder: dict[str, Any]
    dims: dict[str, int | None]
    fingerprint: str
    build: dict[str, Any]
    parts: list[PartEntry]
    totals: dict[str, Any]
    index: IndexEntry | None = None
    tombstones: list[TombstoneEntry] = field(default_factory=list)
    curation: CurationEntry | None = None

    @classmethod
    def parse(cls, data: Any, where: str) -> Manifest:
        """A manifest from its JSON form; BankFormatError for another format or anything malformed."""
        _check_format(data, "format_version", FORMAT_VERSION, f"{where} has format", "Rebuild the bank or use a "
                      "matching refbank release.")
        m = _typed(cls, data, where, {"parts": _parse_list(PartEntry.parse), "index": IndexEntry.parse,
                                      "tombstones": _parse_list(TombstoneEntry.parse),
                                      "curation": CurationEntry.parse})
        if not isinstance(m.encoder, dict) or not isinstance(m.dims, dict) or "visual" not in m.dims:
            raise BankFormatError(f"{where}: encoder and dims must be objects, dims with 'visual'")
        return m

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what versions/<v>/manifest.json holds)."""
        return asdict(self)

    def with_(self, **changes: Any) -> Manifest:
        """A copy with `changes` applied (a manifest itself is never changed)."""
        return replace(self, **changes)

    @property
    def part_by_ordinal(self) -> dict[int, PartEntry]:
        """Parts keyed by ordinal."""
        return {p.ordinal: p for p in self.parts}

    def curated(self, part: str) -> CuratedPart | None:
        """The curation decisions of part `part` in this version, None when it is uncurated."""
        return self.curation.by_part.get(part) if self.curation is not None else None


def totals(parts: list[PartEntry]) -> dict[str, Any]:
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


def make_manifest(parts: list[PartEntry], encoder_spec: dict[str, Any], fingerprint: str,
                  build: dict[str, Any], index: IndexEntry | None = None) -> Manifest:
    """A manifest naming `parts` (sorted by ordinal) with totals; `version` and `parent` are set by `publish`."""
    parts = sorted(parts, key=lambda p: p.ordinal)
    return Manifest(
        format_version=FORMAT_VERSION, version=None, parent=None,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), encoder=dict(encoder_spec),
        dims={"visual": encoder_spec["visual_dim"], "text": encoder_spec["text_dim"]}, fingerprint=fingerprint,
        build=dict(build), parts=list(parts), totals=totals(parts), index=index,
    )
