"""Object-storage access through fsspec: URLs in, bytes out, every write whole or not at all, every call retried.

Every function here runs its storage call under `retries.RETRY` (transient failures — throttling, 5xx, resets
— are tried again with backoff; then StorageError names the operation and the object) and counts its tries
(`counters()`). s3fs and botocore have retry loops of their own; for the clients this module makes both are set
to a single try, so the policy in retries.py is the only one and every try is counted. Code that reads or
writes a bank goes through these functions, not through a filesystem of its own.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import threading
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from bank_builder.format.retries import (
    ConditionalWritesUnsupported,
    PreconditionFailed,
    StorageCounts,
    counters,
    retrying,
    retrying_batch,
)

__all__ = ["ConditionalWritesUnsupported", "PreconditionFailed", "RangeFile", "StorageCounts", "conditional_writes",
           "counters", "exists", "glob", "join", "list_names", "one_try_fs", "read_bytes", "read_json", "read_range",
           "read_ranges", "read_tagged", "remove_tree", "replace_if", "size", "url_to_fs", "write_bytes",
           "write_if_absent", "write_json"]

# How a conditional write is told that its condition failed (S3: HTTP 412 PreconditionFailed).
_S3_PRECONDITION = ("PreconditionFailed", "ConditionalRequestConflict")
_ONE_TRY = {"total_max_attempts": 1}  # botocore's retry loop off: retries.RETRY is the policy


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of a local path, file:// or s3:// (any fsspec) URL.

    A plain fsspec filesystem, with the retries s3fs and botocore do on their own (uncounted): code that reads
    or writes a bank should call the functions of this module instead, which retry by `retries.RETRY`."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def one_try_fs(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """`url_to_fs` for calls made under `retries.retrying` (this module's, and listing a corpus): on S3 a client
    that tries each request once (botocore's and s3fs's retry loops off), so that `retries.RETRY` is the only
    policy and every try is counted."""
    options = dict(storage_options or {})
    if fsspec.core.split_protocol(url)[0] in ("s3", "s3a"):
        options["config_kwargs"] = {**(options.get("config_kwargs") or {}), "retries": _ONE_TRY}
    fs, path = fsspec.core.url_to_fs(url, **options)
    if _is_s3(fs):
        fs.retries = 1  # s3fs's own loop around each call (5 tries by default); this client is ours alone
    return fs, path


def join(url: str, *parts: str) -> str:
    """`url` with `parts` appended, '/'-separated, whatever the scheme."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write `data` to `url` atomically: readers see the old object or the new one, never a part of it."""
    fs, path = one_try_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        # A local write is not atomic: write a sibling temp file, then rename over the target.
        retrying("write", url, lambda: os.replace(_local_temp(path, data), path))
        return
    try:
        # An object-store PUT is atomic already: the object appears whole when the request completes.
        retrying("write", url, lambda: fs.pipe_file(path, data))
    finally:
        fs.invalidate_cache(path)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole object at `url`; FileNotFoundError when there is none."""
    fs, path = one_try_fs(url, storage_options)
    if _is_s3(fs):  # one GET (s3fs's cat_file asks for the size first, to split big objects into ranges)
        return retrying("read", url, lambda: _s3_get(fs, path)[0])
    return retrying("read", url, lambda: fs.cat_file(path))


def read_range(url: str, start: int, end: int, storage_options: dict[str, Any] | None = None) -> bytes:
    """Bytes [start, end) of the object at `url` (fewer when it ends before `end`): one ranged request."""
    fs, path = one_try_fs(url, storage_options)
    return retrying("read", url, lambda: fs.cat_file(path, start=start, end=end))


def size(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """The object's size in bytes; FileNotFoundError when there is none."""
    fs, path = one_try_fs(url, storage_options)
    fs.invalidate_cache(path)
    return retrying("stat", url, lambda: int(fs.info(path)["size"]))


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether an object exists at `url` (no listing cache: another process may have just written it)."""
    fs, path = one_try_fs(url, storage_options)
    fs.invalidate_cache(path)

    def check() -> bool:
        try:
            fs.info(path)
            return True
        except FileNotFoundError:
            return False

    return retrying("stat", url, check)


def list_names(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names of the objects and folders directly under `url` (the last path component); [] when there are none."""
    fs, path = one_try_fs(url, storage_options)
    fs.invalidate_cache(path)

    def names() -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    return retrying("list", url, names)


def glob(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """In-filesystem paths matching the pattern `url` ('*' and '?' within a component), e.g. versions/*/published.json.

    One recursive listing of the pattern's fixed prefix (S3: a request per 1000 keys), filtered here. fsspec's own
    glob lists folder by folder and leaves out a folder whose listing failed: a silent loss under faults."""
    fs, path = one_try_fs(url, storage_options)
    fixed = re.split(r"[*?]", path, maxsplit=1)[0]
    root = fixed.rsplit("/", 1)[0] if fixed != path else path
    wanted = re.compile("".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in path))

    def find() -> list[str]:
        fs.invalidate_cache(root)  # another process may have written under it
        try:
            return [p for p in fs.find(root) if wanted.fullmatch(p.rstrip("/"))]
        except FileNotFoundError:
            return []

    return retrying("list", url, find)


def list_tree(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every object under `url`, by name relative to it, with fsspec's details (size, mtime / LastModified): one
    recursive listing (S3: a request per 1000 keys), retried as a whole; {} when nothing is there."""
    fs, path = one_try_fs(url, storage_options)
    root = path.rstrip("/")

    def find() -> dict[str, dict[str, Any]]:
        fs.invalidate_cache(root)  # another process may have written under it
        try:
            return {p[len(root) + 1:]: info for p, info in fs.find(root, detail=True).items()}
        except FileNotFoundError:
            return {}

    return retrying("list", url, find)


def remove_tree(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the object or folder at `url` and everything under it (nothing to do when it is gone)."""
    fs, path = one_try_fs(url, storage_options)

    def remove() -> None:
        fs.invalidate_cache(path)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass  # gone already (perhaps by an earlier try whose answer was lost)

    retrying("delete", url, remove)


def write_json(url: str, value: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Write `value` as indented JSON, atomically."""
    write_bytes(url, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode(), storage_options)


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Parse the JSON object at `url`."""
    return json.loads(read_bytes(url, storage_options))


def read_ranges(urls: list[str], starts: list[int], ends: list[int],
                storage_options: dict[str, Any] | None = None) -> list[bytes]:
    """Bytes [start, end) of each url, fetched together: concurrently where the store allows (s3fs). A range
    that fails transiently is fetched again on its own; one request per range."""
    if not urls:
        return []
    fs, _ = one_try_fs(urls[0], storage_options)
    paths = [fs._strip_protocol(url) for url in urls]  # one client for all: resolving each costs a tokenize

    def fetch(indices: list[int]) -> list[Any]:
        return list(fs.cat_ranges([paths[i] for i in indices], [starts[i] for i in indices],
                                  [ends[i] for i in indices], on_error="return"))

    return retrying_batch("read", urls, fetch)


def conditional_writes(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether the store holding `url` (a bank's root) honours conditional writes, so that `write_if_absent` and
    `replace_if` are atomic. Local disks do; S3 is probed once per process and bucket; other stores do not.

    The probe matters because an S3-compatible store that does not implement conditional writes may accept an
    If-None-Match / If-Match PUT as a plain one: two writers would then both "win" and one would silently lose
    its update. Probe: write a scratch object, then create it again conditionally; only a refusal counts."""
    fs, path = one_try_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return True
    if not _is_s3(fs):
        return False
    bucket = fs.split_path(path)[0]
    key = (str((storage_options or {}).get("endpoint_url")), bucket)
    with _PROBE_LOCK:
        if key not in _CONDITIONAL:
            _CONDITIONAL[key] = _probe_conditional(fs, join(url, f".refbank-probe-{uuid.uuid4().hex}"),
                                                   storage_options)
        return _CONDITIONAL[key]


_CONDITIONAL: dict[tuple[str, str], bool] = {}  # (endpoint, bucket) → honours conditional writes
_PROBE_LOCK = threading.Lock()


def _probe_conditional(fs: fsspec.AbstractFileSystem, url: str, storage_options: dict[str, Any] | None) -> bool:
    """Create `url` plainly, then again with If-None-Match: *; True when the store refuses the second."""
    path = fs._strip_protocol(url)
    write_bytes(url, b"first", storage_options)
    try:
        _s3_conditional_put(fs, path, url, b"second", {"mode": "create"}, "create", storage_options)
        honoured = False
    except PreconditionFailed:
        honoured = True
    finally:
        remove_tree(url, storage_options)
    return honoured


def write_if_absent(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Create the object at `url` with `data`; PreconditionFailed when it exists already (never overwrites).

    Local: the whole file is written under a temp name, then hard-linked to `url` (link fails if it exists).
    S3: a PUT with If-None-Match: * (conditional writes; see `_s3_conditional_put` for a lost answer). Other
    stores: an existence check, then a write — not atomic, so two writers may both write. refbank uses it there
    only for objects whose name fixes their bytes (parts, rejects, tombstones, publication records); version
    manifests on such stores are claimed under the bank's lease (`lease.py`)."""
    fs, path = one_try_fs(url, storage_options)
    if not isinstance(fs, LocalFileSystem) and not _is_s3(fs):
        if exists(url, storage_options):
            raise PreconditionFailed(f"{url} exists already")
        write_bytes(url, data, storage_options)
        return
    if isinstance(fs, LocalFileSystem):
        def create() -> None:
            tmp = _local_temp(path, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PreconditionFailed(f"{url} exists already") from None
            finally:
                os.unlink(tmp)

        retrying("create", url, create)
        return
    _s3_conditional_put(fs, path, url, data, {"mode": "create"}, "create", storage_options)


def read_tagged(url: str, storage_options: dict[str, Any] | None = None) -> tuple[bytes | None, str | None]:
    """(the object's bytes, its version tag) or (None, None) when absent; the tag is what `replace_if` compares.

    Local and other stores: the tag is the content itself (names written through `replace_if` never repeat a
    value). S3: the ETag returned with the same GET, so bytes and tag always belong together."""
    fs, path = one_try_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return retrying("read", url, lambda: _local_tagged(path))
    if _is_s3(fs):
        try:
            return retrying("read", url, lambda: _s3_get(fs, path))
        except FileNotFoundError:
            return None, None
    try:
        data = read_bytes(url, storage_options)
    except FileNotFoundError:
        return None, None
    return data, data.hex()


def replace_if(url: str, data: bytes, expected_tag: str | None,
               storage_options: dict[str, Any] | None = None) -> None:
    """Replace the object at `url` with `data` only if its tag is still `expected_tag` (None: only if it does
    not exist); PreconditionFailed otherwise. Readers see the old object or the new one, never a mix.

    Local: compare and rename under an exclusive lock on the folder (flock), so two writers on one machine
    cannot interleave. S3: a PUT with If-Match: <ETag> (or If-None-Match: *)."""
    fs, path = one_try_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        def swap() -> None:
            with _folder_lock(os.path.dirname(path)):
                if _local_tagged(path)[1] != expected_tag:
                    raise PreconditionFailed(f"{url} changed (another writer published first)")
                os.replace(_local_temp(path, data), path)

        retrying("replace", url, swap)
        return
    condition = {"mode": "create"} if expected_tag is None else {"IfMatch": expected_tag}
    _s3_conditional_put(fs, path, url, data, condition, "replace", storage_options)


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over one object of known size: each read is one ranged request (retried,
    counted), with no read-ahead. `windows`: (offset, bytes) pieces already fetched; reads inside one cost nothing.

    For Parquet readers (pyarrow): they read exactly the footer and the column chunks they decode."""

    def __init__(self, url: str, size: int, storage_options: dict[str, Any] | None = None,
                 windows: list[tuple[int, bytes]] | None = None) -> None:
        super().__init__()
        self.url, self._size, self._options, self._pos = url, size, storage_options, 0
        self._windows = list(windows or [])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b""
        held = next((w for w in self._windows if w[0] <= self._pos and end <= w[0] + len(w[1])), None)
        if held is not None:
            data = held[1][self._pos - held[0]:end - held[0]]
        else:
            data = read_range(self.url, self._pos, end, self._options)
            if len(data) != end - self._pos:  # the object is shorter than its recorded size
                raise EOFError(f"{self.url} ends before byte {end} (it should hold {self._size} bytes)")
        self._pos = end
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)

    def size(self) -> int:
        """The object's size in bytes, as given."""
        return self._size


def _local_tagged(path: str) -> tuple[bytes | None, str | None]:
    """A local file's bytes and tag (its content in hex), or (None, None) when absent."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, None
    return data, data.hex()


def _local_temp(path: str, data: bytes) -> str:
    """A whole, synced sibling temp file of local `path` holding `data`; its name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


@contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """An exclusive advisory lock on a local folder, held for the block (flock on the folder itself)."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _s3_get(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, str]:
    """(body, ETag) of one S3 GET of a whole object: bytes and tag of the same version."""
    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[bytes, str]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    return fsspec.asyn.sync(fs.loop, get)


def _s3_conditional_put(fs: fsspec.AbstractFileSystem, path: str, url: str, data: bytes,
                        condition: dict[str, str], operation: str, storage_options: dict[str, Any] | None) -> None:
    """One conditional PUT through s3fs, retried like any call; PreconditionFailed when the store refuses it.

    A refusal is never tried again. But a refusal can answer this writer's own write: the store applied a try
    whose answer was lost (a reset after the request went through), and the next try — ours, or aiohttp's own
    resend of an idempotent request on a dropped keep-alive connection — finds the object already there. So
    after a refusal the object is read back, and the write counts as done only when it holds exactly `data`
    (a version name, or content named by its hash: no other writer writes those bytes to this name)."""
    if not _is_s3(fs):
        raise ConditionalWritesUnsupported(_unsupported(url, fs))

    def put() -> None:
        try:
            fs.pipe_file(path, data, **condition)
        except OSError as exc:
            code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
            if isinstance(exc, FileExistsError) or code in _S3_PRECONDITION:
                raise PreconditionFailed(f"{url}: the store refused the conditional write ({code or exc})") from None
            raise

    try:
        retrying(operation, url, put)
    except PreconditionFailed:
        fs.invalidate_cache(path)
        if read_tagged(url, storage_options)[0] != data:
            raise
    finally:
        fs.invalidate_cache(path)


def _unsupported(url: str, fs: fsspec.AbstractFileSystem) -> str:
    return (f"{url}: {type(fs).__name__} offers no conditional writes (compare-and-swap); refbank publishes on "
            "such stores under the bank's lease (bank_builder.format.lease), never through this call")
