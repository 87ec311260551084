"""Ingest stage: list WebDataset shards, stream their samples, decode and validate each one.

A shard is read once, front to back, as a tar stream; each group of consecutive members sharing a key
becomes a `Sample`, or a `Reject` saying why not. Only a shard that cannot be opened at all raises.
"""

from __future__ import annotations

import importlib
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import urlparse

import fsspec
from braceexpand import braceexpand

from bank_builder.config import MASK_PROBE_SAMPLES, IngestConfig, MaskKind, OnMissingMask
from bank_builder.decode import decode_sample
from bank_builder.format.retries import retrying
from bank_builder.format.storage import one_try_fs
from bank_builder.records import Reject, RejectReason, Sample


class ShardReadError(RuntimeError):
    """A shard that cannot be opened, or is not a tar at all; the pipeline retries it, then reports it."""


# ----------------------------------------------------------------------------------------- listing

_GLOB_CHARS = frozenset("*?[")
# Below this many brace-expanded names in one folder, checking each name is cheaper than listing it.
_LIST_FOLDER_FROM = 8


class SourceError(ValueError):
    """A shard pattern that names no shard: nothing matches, or named shards are missing."""


class SourceIsFolderError(SourceError):
    """The pattern is a folder (the corpus folder given instead of a pattern of its shards)."""


def list_shards(pattern: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Sorted, de-duplicated shard URLs matching `pattern` ({a..b}/{x,y} braces, then * ? [] globs).

    URLs keep the pattern's scheme (s3://bucket/key); a pattern without a scheme gives absolute local
    paths. Raises SourceError when nothing matches or a name spelled out without a glob is missing
    (SourceIsFolderError when the pattern is a folder); StorageError when the store cannot be listed.
    """
    return sorted(shard_sizes(pattern, storage_options))


def shard_sizes(pattern: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """{shard URL: size in bytes} of the shards `list_shards` lists (the sizes come with the listing)."""
    expanded = list(dict.fromkeys(braceexpand(pattern)))
    found, missing = _match(expanded, storage_options or {})
    if not found:
        folder = _folder_given(expanded, storage_options or {})
        if folder:
            raise SourceIsFolderError(f"{pattern!r} is a folder, not a shard pattern; give its shards, e.g. "
                              f"'{folder.rstrip('/')}/*.tar' (quoted, so the shell leaves the * alone)")
        tried = ", ".join(expanded[:5]) + (f", … ({len(expanded)} in all)" if len(expanded) > 5 else "")
        raise SourceError(
            f"no shard matches {pattern!r} (tried {tried}); check the path, the bucket and storage_options "
            "(e.g. endpoint_url)"
        )
    if missing:
        raise SourceError(
            f"{len(missing)} of the shards named by {pattern!r} do not exist (first: {missing[0]}); fix the "
            "range, or use a glob (*) to take whatever exists"
        )
    return found


def _match(urls: list[str], options: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
    """({URL found: bytes}, URLs named without a glob that do not exist); named ones are checked per folder."""
    found: dict[str, int] = {}
    named: dict[tuple[int, str], list[tuple[Any, str, bool]]] = {}  # (filesystem, folder) → its names
    for url in urls:
        fs, path = one_try_fs(url, options)
        keep_scheme = "://" in url or "::" in url
        if _GLOB_CHARS & set(path):
            found.update((_as_url(fs, p, keep_scheme), n) for p, n in _glob_files(fs, path, url).items())
        else:
            named.setdefault((id(fs), fs._parent(path)), []).append((fs, path, keep_scheme))
    missing = []
    for (_, folder), entries in named.items():
        present = _existing_files(entries[0][0], folder, [path for _, path, _ in entries])
        for fs, path, keep_scheme in entries:
            if path in present:
                found[_as_url(fs, path, keep_scheme)] = present[path]
            else:
                missing.append(_as_url(fs, path, keep_scheme))
    return found, missing


def _glob_files(fs: Any, path: str, url: str) -> dict[str, int]:
    """{path: bytes} of the files (not folders) matching a glob; none when the folder or bucket does not exist."""
    def glob() -> dict[str, int]:
        try:
            return {p: int(info.get("size") or 0) for p, info in fs.glob(path, detail=True).items()
                    if info.get("type") == "file"}
        except FileNotFoundError:
            return {}

    return retrying("list", url, glob)


def _existing_files(fs: Any, folder: str, paths: list[str]) -> dict[str, int]:
    """{path: bytes} of those of `paths` (all in `folder`) that exist as files; one listing when there are many.
    Only "not found" means missing: fsspec's isfile would also say False for a store it cannot reach."""
    if len(paths) < _LIST_FOLDER_FROM:
        sizes = {p: retrying("stat", fs.unstrip_protocol(p), lambda p=p: _file_size(fs, p)) for p in paths}
        return {p: n for p, n in sizes.items() if n is not None}

    def listing() -> dict[str, int]:
        try:
            return {info["name"]: int(info.get("size") or 0) for info in fs.ls(folder, detail=True)
                    if info.get("type") == "file"}
        except FileNotFoundError:
            return {}

    listed = retrying("list", fs.unstrip_protocol(folder), listing)
    return {p: listed[p] for p in paths if p in listed}


def _file_size(fs: Any, path: str) -> int | None:
    """Bytes of the file at `path`; None when there is none (or it is a folder)."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return int(info.get("size") or 0) if info.get("type") == "file" else None


def _folder_given(urls: list[str], options: dict[str, Any]) -> str | None:
    """The pattern itself when it is one existing folder (a common slip: the corpus folder instead of its shards)."""
    if len(urls) != 1 or _GLOB_CHARS & set(urls[0]):
        return None
    fs, path = one_try_fs(urls[0], options)
    try:
        is_folder = retrying("stat", urls[0], lambda: fs.info(path).get("type") == "directory")
    except FileNotFoundError:
        return None
    return urls[0] if is_folder else None


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


class _CountedReader:
    """A shard's stream that counts the bytes read through it: how far into the shard (as stored, so compressed
    for .tar.gz) the build is, for progress and ETA."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data


Groups = Iterator[tuple[str, dict[str, bytes]]]  # (key, {extension: bytes}) per sample, in shard order


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
    with open_shard(shard, storage_options) as raw:
        stream = _CountedReader(raw)
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)
        except Exception as exc:  # ReadError, CompressionError, or the stream's own errors
            raise ShardReadError(f"shard {shard} is not a readable tar: {exc}") from exc
        with tar:
            groups = _member_groups(tar, shard)
            on_missing, groups = _missing_mask_policy(config, groups)
            try:
                for index, (key, members) in enumerate(groups):
                    item = decode_sample(shard, key, index, members, config, on_missing)
                    if isinstance(item, Sample):
                        item.stream_bytes = stream.count
                    yield item
            except _TruncatedShard as cut:
                yield Reject(shard=shard, key=cut.key, reason=RejectReason.TRUNCATED_MEMBER, detail=cut.detail)


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


def _member_groups(tar: tarfile.TarFile, shard: str) -> Groups:
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
