"""Ingest stage: list WebDataset shards, stream their samples, decode and validate each one.

A shard is read once, front to back, as a tar stream; each group of consecutive members sharing a key
becomes a `Sample`, or a `Reject` saying why not. Only a shard that cannot be opened at all raises.
"""

from __future__ import annotations

import importlib
import io
import json
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import urlparse

import fsspec
import numpy as np
from braceexpand import braceexpand
from PIL import Image

from bank_builder.config import MASK_PROBE_SAMPLES, IngestConfig, MaskKind, OnMissingMask
from bank_builder.records import Reject, RejectReason, Sample


class ShardReadError(RuntimeError):
    """A shard that cannot be opened, or is not a tar at all; the pipeline retries it, then reports it."""


class RejectError(Exception):
    """One unusable sample; raised inside a build stage and turned into a `Reject` row at its boundary."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(reason, detail)  # both in args, so it pickles (Ray) and unpickles intact
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"

    def to_reject(self, shard: str, key: str) -> Reject:
        """The `Reject` row for this error on sample `key` of `shard`."""
        return Reject(shard=shard, key=key, reason=self.reason, detail=self.detail)


# ----------------------------------------------------------------------------------------- listing

_GLOB_CHARS = frozenset("*?[")
# Below this many brace-expanded names in one folder, checking each name is cheaper than listing it.
_LIST_FOLDER_FROM = 8


def list_shards(pattern: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Sorted, de-duplicated shard URLs matching `pattern` ({a..b}/{x,y} braces, then * ? [] globs).

    URLs keep the pattern's scheme (s3://bucket/key); a pattern without a scheme gives absolute local
    paths. Raises ValueError when nothing matches, or when a name spelled out without a glob is missing.
    """
    expanded = list(dict.fromkeys(braceexpand(pattern)))
    found, missing = _match(expanded, storage_options or {})
    if not found:
        tried = ", ".join(expanded[:5]) + (f", … ({len(expanded)} in all)" if len(expanded) > 5 else "")
        raise ValueError(
            f"no shard matches {pattern!r} (tried {tried}); check the path, the bucket and storage_options "
            "(e.g. endpoint_url)"
        )
    if missing:
        raise ValueError(
            f"{len(missing)} of the shards named by {pattern!r} do not exist (first: {missing[0]}); fix the "
            "range, or use a glob (*) to take whatever exists"
        )
    return sorted(found)


def _match(urls: list[str], options: dict[str, Any]) -> tuple[set[str], list[str]]:
    """(URLs found, URLs named without a glob that do not exist); named ones are checked per folder."""
    found: set[str] = set()
    named: dict[tuple[int, str], list[tuple[Any, str, bool]]] = {}  # (filesystem, folder) → its names
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **options)
        keep_scheme = "://" in url or "::" in url
        if _GLOB_CHARS & set(path):
            found.update(_as_url(fs, p, keep_scheme) for p in _glob_files(fs, path))
        else:
            named.setdefault((id(fs), fs._parent(path)), []).append((fs, path, keep_scheme))
    missing = []
    for (_, folder), entries in named.items():
        present = _existing_files(entries[0][0], folder, [path for _, path, _ in entries])
        for fs, path, keep_scheme in entries:
            if path in present:
                found.add(_as_url(fs, path, keep_scheme))
            else:
                missing.append(_as_url(fs, path, keep_scheme))
    return found, missing


def _glob_files(fs: Any, path: str) -> list[str]:
    """Files (not folders) matching a glob; none when the folder or bucket does not exist."""
    try:
        return [p for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"]
    except FileNotFoundError:
        return []


def _existing_files(fs: Any, folder: str, paths: list[str]) -> set[str]:
    """Those of `paths` (all in `folder`) that exist as files; one listing when there are many."""
    if len(paths) < _LIST_FOLDER_FROM:
        return {p for p in paths if fs.isfile(p)}
    try:
        listed = {info["name"] for info in fs.ls(folder, detail=True) if info.get("type") == "file"}
    except FileNotFoundError:
        return set()
    return set(paths) & listed


def _as_url(fs: Any, path: str, keep_scheme: bool) -> str:
    """The URL of a listed path: with its scheme when the pattern had one, else the local path."""
    return fs.unstrip_protocol(path) if keep_scheme else path


# ----------------------------------------------------------------------------------------- opening

# webdataset shells out to gsutil for gs://, which never sees storage_options; fsspec (gcsfs) does.
_FSSPEC_OVER_WEBDATASET = frozenset({"gs"})


def _gopen_module() -> Any:
    # `webdataset.gopen` the attribute is the function; the dispatch table lives in the module.
    return importlib.import_module("webdataset.gopen")


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, storage_options: dict | None = None) -> BinaryIO:
    """webdataset gopen handler for fsspec URLs (s3://, gs://, az://, memory://, ...)."""
    return fsspec.open(url, mode, **(storage_options or {})).open()


def register_gopen_schemes() -> None:
    """Let webdataset.gopen open every fsspec scheme it has no opener for (s3:// first). Idempotent."""
    table = _gopen_module().gopen_schemes
    for protocol in fsspec.available_protocols():
        if protocol not in table or protocol in _FSSPEC_OVER_WEBDATASET:
            table[protocol] = _gopen_fsspec


def open_shard(url: str, storage_options: dict[str, Any] | None = None) -> BinaryIO:
    """A binary stream of one shard (local path, file://, or any fsspec URL); ShardReadError if it fails."""
    register_gopen_schemes()  # here, not at import: every process that opens a shard (Ray workers) has it
    gopen = _gopen_module()
    ours = gopen.gopen_schemes.get(urlparse(url).scheme) is _gopen_fsspec
    try:
        return gopen.gopen(url, "rb", **({"storage_options": storage_options} if ours else {}))
    except Exception as exc:  # the backends' error types are open-ended (OSError, botocore, ...)
        raise ShardReadError(f"cannot open shard {url}: {exc}") from exc


# ----------------------------------------------------------------------------------------- streaming

# What a cut or corrupt archive raises while it is streamed; anything else (network) is a ShardReadError.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error)


class _TruncatedShard(Exception):
    def __init__(self, key: str, detail: str) -> None:
        super().__init__(detail)
        self.key = key
        self.detail = detail


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records why tarfile stopped: past the first member it ends silently on a cut or invalid header."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.refbank_stop = exc  # type: ignore[attr-defined]
            raise


def iter_samples(
    shard: str, config: IngestConfig, storage_options: dict[str, Any] | None = None
) -> Iterator[Sample | Reject]:
    """Stream one shard (.tar or .tar.gz) as Samples / Rejects in shard order; index counts both.

    A sample without a usable mask follows `config.on_missing_mask`, or, when that is None, the shard's
    own default (see `IngestConfig`): the first MASK_PROBE_SAMPLES member groups are held back (raw bytes)
    until one with a mask member shows the shard has masks.
    Raises ShardReadError when the shard cannot be opened, is not a tar, or its stream fails for a
    reason other than cut/corrupt data; a cut or corrupt tail ends the shard with one TRUNCATED_MEMBER.
    """
    with open_shard(shard, storage_options) as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)
        except Exception as exc:  # ReadError, CompressionError, or the stream's own errors
            raise ShardReadError(f"shard {shard} is not a readable tar: {exc}") from exc
        with tar:
            groups = _member_groups(tar, shard)
            on_missing, groups = _missing_mask_policy(config, groups)
            try:
                for index, (key, members) in enumerate(groups):
                    yield decode_sample(shard, key, index, members, config, on_missing)
            except _TruncatedShard as cut:
                yield Reject(shard=shard, key=cut.key, reason=RejectReason.TRUNCATED_MEMBER, detail=cut.detail)


Groups = Iterator[tuple[str, dict[str, bytes]]]


def _missing_mask_policy(config: IngestConfig, groups: Groups) -> tuple[OnMissingMask, Groups]:
    """(what a sample without a usable mask becomes in this shard, the same groups to iterate).

    Only an AUTO shard without an explicit policy is probed; its held-back groups are replayed first,
    and a truncation met while probing is raised again after them, where the caller expects it.
    """
    if config.on_missing_mask is not None:
        return config.on_missing_mask, groups
    if config.mask_kind is MaskKind.NONE:
        return OnMissingMask.SUPERPIXELS, groups
    if config.mask_kind is not MaskKind.AUTO:
        return OnMissingMask.REJECT, groups  # the user said the corpus has masks
    head: list[tuple[str, dict[str, bytes]]] = []
    cut: _TruncatedShard | None = None
    try:
        for group in groups:
            head.append(group)
            if _has_mask_member(group[1], config) or len(head) == MASK_PROBE_SAMPLES:
                break
    except _TruncatedShard as exc:
        cut = exc
    masked = any(_has_mask_member(members, config) for _, members in head)

    def replay() -> Groups:
        yield from head
        if cut is not None:
            raise cut
        yield from groups

    return (OnMissingMask.REJECT if masked else OnMissingMask.SUPERPIXELS), replay()


def _has_mask_member(members: dict[str, bytes], config: IngestConfig) -> bool:
    return config.mask_key in members or config.rle_key in members


def _member_groups(tar: tarfile.TarFile, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per run of consecutive members sharing a key; _TruncatedShard at a cut.

    We walk the members ourselves rather than use webdataset's tar_file_iterator: its error handler
    cannot tell which member a truncation hit, and the reject must name that sample.
    """
    key, group = "", {}
    while True:
        try:
            member = tar.next()
            if member is None:
                break
            tar.members = []  # stream mode keeps every TarInfo otherwise; memory would grow per shard
            name = _split_name(member.name) if member.isfile() else None
            if name is None:
                continue
            if name[0] != key and group:
                yield key, group
                group = {}
            key = name[0]
            group[name[1]] = tar.extractfile(member).read()
        except _ARCHIVE_ERRORS as exc:
            raise _TruncatedShard(key, f"shard {shard} is cut or corrupt while reading {key!r}: {exc}") from exc
        except Exception as exc:
            raise ShardReadError(f"reading shard {shard} failed at {key!r}: {exc}") from exc
    stop = getattr(tar, "refbank_stop", None)
    if not isinstance(stop, tarfile.EOFHeaderError):
        # No end-of-archive marker: the last group may be missing members, so it cannot be trusted.
        raise _TruncatedShard(key, f"shard {shard} ends without an end-of-archive marker after {key!r} ({stop})")
    if group:
        yield key, group


def _split_name(name: str) -> tuple[str, str] | None:
    """('dir/base', 'mask.png') for 'dir/base.mask.png'; None for names outside any sample (no '.')."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


# ----------------------------------------------------------------------------------------- decoding


def decode_sample(shard: str, key: str, index: int, members: dict[str, bytes], config: IngestConfig,
                  on_missing: OnMissingMask = OnMissingMask.REJECT) -> Sample | Reject:
    """Decode one group of members ({extension: bytes}) into a validated Sample, or a Reject.

    on_missing: what a sample without a usable mask becomes (a reject, or a Sample without mask_kind,
    which the segments stage cuts into superpixels); iter_samples resolves it per shard.
    """
    try:
        image = _decode_image(members, config)
        meta = _decode_meta(members, config)
        kind = _mask_kind(members, meta, config, on_missing)
        mask, annotations = _decode_mask(members, kind, config, image.shape[:2])
    except RejectError as exc:
        return exc.to_reject(shard, key)
    return Sample(shard=shard, key=key, index=index, image=image, mask_kind=kind, mask=mask,
                  annotations=annotations, meta=meta)


def _open_image(data: bytes, member: str, reason: RejectReason) -> Image.Image:
    """PIL image of a member, header only (pixels not decoded yet)."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise RejectError(RejectReason.IMAGE_TOO_LARGE, f"{member}: {exc} (PIL's Image.MAX_IMAGE_PIXELS)") from exc
    except Exception as exc:  # PIL raises many types on corrupt input (OSError, SyntaxError, ...)
        raise RejectError(reason, f"{member} is not a readable image: {exc}") from exc


def _load(image: Image.Image, member: str, reason: RejectReason) -> None:
    """Decode the pixels; truncated or corrupt data becomes a reject."""
    try:
        image.load()
    except Exception as exc:  # see _open_image
        raise RejectError(reason, f"{member} cannot be decoded: {exc}") from exc


def _decode_image(members: dict[str, bytes], config: IngestConfig) -> np.ndarray:
    """(H, W, 3) uint8 RGB from the first image member present, size-checked before decoding."""
    ext = next((e for e in config.image_keys if e in members), None)
    if ext is None:
        raise RejectError(
            RejectReason.MISSING_IMAGE,
            f"no image member: expected one of {list(config.image_keys)}, found {sorted(members)}",
        )
    image = _open_image(members[ext], ext, RejectReason.UNDECODABLE_IMAGE)
    width, height = image.size
    if width * height > config.max_image_pixels:
        raise RejectError(
            RejectReason.IMAGE_TOO_LARGE,
            f"{ext} is {width}x{height} = {width * height} px > max_image_pixels={config.max_image_pixels}; "
            "raise IngestConfig.max_image_pixels to keep it",
        )
    _load(image, ext, RejectReason.UNDECODABLE_IMAGE)
    # No EXIF transpose: masks are aligned with the stored pixels, not with the display orientation.
    return _to_rgb(image)


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of any PIL mode; 16-bit grey is scaled (PIL's convert would clip it at 255)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _decode_meta(members: dict[str, bytes], config: IngestConfig) -> dict[str, Any]:
    """The parsed json member (an object), {} when absent."""
    if config.json_key not in members:
        return {}
    meta = _parse_json(members[config.json_key], config.json_key, RejectReason.BAD_JSON)
    if not isinstance(meta, dict):
        raise RejectError(RejectReason.BAD_JSON, f"{config.json_key} holds a {type(meta).__name__}, expected an object")
    return meta


def _parse_json(data: bytes, member: str, reason: RejectReason) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise RejectError(reason, f"{member} is not valid JSON: {exc}") from exc


# AUTO: with a mask.png, the first of these json keys present (and of this type) names the mask kind.
# `label` comes before `classes` because a binary sample's json may carry a dataset's whole class table.
_KIND_KEYS = (("segments", list, MaskKind.INSTANCE), ("label", str, MaskKind.BINARY), ("classes", dict, MaskKind.CLASS))


def _mask_kind(members: dict[str, bytes], meta: dict[str, Any], config: IngestConfig,
               on_missing: OnMissingMask) -> MaskKind | None:
    """How to read this sample's mask; None (superpixels) or a RejectError when it has no usable one.

    AUTO: a mask.png whose json names its kind, else an rle.json, else no usable mask.
    """
    kind = config.mask_kind
    if kind is MaskKind.NONE:
        return None
    if kind is not MaskKind.AUTO:
        member = config.rle_key if kind is MaskKind.RLE else config.mask_key
        if member in members:
            return kind
        return _missing(on_missing, RejectReason.MISSING_MASK,
                        f"no {member} member (mask_kind={kind.value}), found {sorted(members)}; pass "
                        "--mask-kind auto to read each sample by what it holds")
    if config.mask_key in members:
        found = next((k for key, kind_type, k in _KIND_KEYS if isinstance(meta.get(key), kind_type)), None)
        if found is not None:
            return found
    if config.rle_key in members:
        return MaskKind.RLE
    if config.mask_key in members:
        return _missing(on_missing, RejectReason.UNKNOWN_MASK_KIND,
                        f"{config.mask_key} but the {config.json_key} has none of `segments` (instance ids), "
                        "`label` (binary) or `classes` (class indices); add the one that fits, or pass --mask-kind")
    return _missing(on_missing, RejectReason.MISSING_MASK,
                    f"no mask member ({config.mask_key} or {config.rle_key}), found {sorted(members)}")


def _missing(on_missing: OnMissingMask, reason: RejectReason, detail: str) -> None:
    """None (cut the sample into superpixels), or the RejectError the policy asks for."""
    if on_missing is OnMissingMask.SUPERPIXELS:
        return None
    raise RejectError(reason, f"{detail}. Samples without a usable mask are rejected in a shard that has masks; "
                              "pass --on-missing-mask superpixels to cut them into unlabelled superpixels instead")


def _decode_mask(
    members: dict[str, bytes], kind: MaskKind | None, config: IngestConfig, size: tuple[int, int]
) -> tuple[np.ndarray | None, list[dict[str, Any]] | None]:
    """(mask, annotations) of the given kind; (None, None) for a sample without a mask."""
    if kind is None:
        return None, None
    if kind is MaskKind.RLE:
        return None, _decode_annotations(members[config.rle_key], config.rle_key)
    return _decode_mask_png(members[config.mask_key], config.mask_key, size), None


def _decode_annotations(data: bytes, member: str) -> list[dict[str, Any]]:
    """The parsed rle.json: a list of annotation objects (checked in depth by the segments stage)."""
    annotations = _parse_json(data, member, RejectReason.BAD_ANNOTATION)
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise RejectError(RejectReason.BAD_ANNOTATION, f"{member} must be a JSON list of annotation objects")
    return annotations


# Single-channel modes; "P" keeps palette indices (PASCAL VOC class masks are palette PNGs).
_MASK_MODES = frozenset({"1", "L", "P"}) | _SIXTEEN_BIT_MODES


def _decode_mask_png(data: bytes, member: str, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 or uint16 raw mask values; single channel and the image's size, else a reject."""
    mask = _open_image(data, member, RejectReason.UNDECODABLE_MASK)
    if mask.mode not in _MASK_MODES:
        raise RejectError(
            RejectReason.UNDECODABLE_MASK,
            f"{member} has mode {mask.mode}; a mask must be single-channel (8- or 16-bit grey, or palette)",
        )
    height, width = size
    if mask.size != (width, height):
        raise RejectError(
            RejectReason.MASK_SIZE_MISMATCH,
            f"{member} is {mask.size[0]}x{mask.size[1]} but the image is {width}x{height} (W x H)",
        )
    _load(mask, member, RejectReason.UNDECODABLE_MASK)
    values = np.asarray(mask)
    if values.dtype.itemsize == 1:  # L, P, and "1" (bool)
        return values.astype(np.uint8)
    if values.min() < 0 or values.max() > 65535:
        raise RejectError(RejectReason.UNDECODABLE_MASK, f"{member} has values outside 0..65535")
    return values.astype(np.uint16)
