"""Object-storage access through fsspec: URLs in, bytes out, every write whole or not at all."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

# How a conditional write is told that its condition failed (S3: HTTP 412 PreconditionFailed).
_S3_PRECONDITION = ("PreconditionFailed", "ConditionalRequestConflict")


class PreconditionFailed(Exception):
    """A conditional write found the object other than expected (created, or changed by another writer)."""


class ConditionalWritesUnsupported(Exception):
    """The store behind a URL offers no conditional writes, so concurrent writers could lose updates."""


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of a local path, file:// or s3:// (any fsspec) URL."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def join(url: str, *parts: str) -> str:
    """`url` with `parts` appended, '/'-separated, whatever the scheme."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write `data` to `url` atomically: readers see the old object or the new one, never a part of it."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        # A local write is not atomic: write a sibling temp file, then rename over the target.
        os.replace(_local_temp(path, data), path)
    else:
        # An object-store PUT is atomic already: the object appears whole when the request completes.
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole object at `url`."""
    fs, path = url_to_fs(url, storage_options)
    return fs.cat_file(path)


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether an object exists at `url` (no listing cache: another process may have just written it)."""
    fs, path = url_to_fs(url, storage_options)
    fs.invalidate_cache(path)
    return fs.exists(path)


def write_json(url: str, value: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Write `value` as indented JSON, atomically."""
    write_bytes(url, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode(), storage_options)


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Parse the JSON object at `url`."""
    return json.loads(read_bytes(url, storage_options))


def read_ranges(urls: list[str], starts: list[int], ends: list[int],
                storage_options: dict[str, Any] | None = None) -> list[bytes]:
    """Bytes [start, end) of each url, fetched together: concurrently where the store allows (s3fs)."""
    if not urls:
        return []
    fs, _ = url_to_fs(urls[0], storage_options)
    paths = [url_to_fs(url, storage_options)[1] for url in urls]
    return list(fs.cat_ranges(paths, list(starts), list(ends)))


def write_if_absent(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Create the object at `url` with `data`; PreconditionFailed when it exists already (never overwrites).

    Local: the whole file is written under a temp name, then hard-linked to `url` (link fails if it exists).
    S3: a PUT with If-None-Match: * (conditional writes). Other stores: ConditionalWritesUnsupported."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        tmp = _local_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise PreconditionFailed(f"{url} exists already") from None
        finally:
            os.unlink(tmp)
        return
    _s3_conditional_put(fs, path, url, data, {"mode": "create"})


def read_tagged(url: str, storage_options: dict[str, Any] | None = None) -> tuple[bytes | None, str | None]:
    """(the object's bytes, its version tag) or (None, None) when absent; the tag is what `replace_if` compares.

    Local: the tag is the content itself (names written through `replace_if` never repeat a value). S3: the ETag
    returned with the same GET, so bytes and tag always belong together."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, data.hex()
    if _is_s3(fs):
        bucket, key, _ = fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            return await response["Body"].read(), response["ETag"]

        try:
            return fsspec.asyn.sync(fs.loop, get)
        except FileNotFoundError:
            return None, None
    raise ConditionalWritesUnsupported(_unsupported(url, fs))


def replace_if(url: str, data: bytes, expected_tag: str | None,
               storage_options: dict[str, Any] | None = None) -> None:
    """Replace the object at `url` with `data` only if its tag is still `expected_tag` (None: only if it does
    not exist); PreconditionFailed otherwise. Readers see the old object or the new one, never a mix.

    Local: compare and rename under an exclusive lock on the folder (flock), so two writers on one machine
    cannot interleave. S3: a PUT with If-Match: <ETag> (or If-None-Match: *)."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        with _folder_lock(os.path.dirname(path)):
            current, tag = read_tagged(url, storage_options)
            if tag != expected_tag:
                raise PreconditionFailed(f"{url} changed (another writer published first)")
            write_bytes(url, data, storage_options)
        return
    condition = {"mode": "create"} if expected_tag is None else {"IfMatch": expected_tag}
    _s3_conditional_put(fs, path, url, data, condition)


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


def _s3_conditional_put(fs: fsspec.AbstractFileSystem, path: str, url: str, data: bytes,
                        condition: dict[str, str]) -> None:
    """One conditional PUT through s3fs; PreconditionFailed when the store refuses it for its condition."""
    if not _is_s3(fs):
        raise ConditionalWritesUnsupported(_unsupported(url, fs))
    try:
        fs.pipe_file(path, data, **condition)
    except OSError as exc:
        code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
        if isinstance(exc, FileExistsError) or code in _S3_PRECONDITION or exc.errno == errno.EEXIST:
            raise PreconditionFailed(f"{url}: the store refused the conditional write ({code or exc})") from None
        raise
    finally:
        fs.invalidate_cache(path)


def _unsupported(url: str, fs: fsspec.AbstractFileSystem) -> str:
    return (f"{url}: refbank publishes bank versions with conditional writes (compare-and-swap), which it "
            f"supports on local disks and S3 (or S3-compatible stores with conditional writes); "
            f"{type(fs).__name__} is neither. Put the bank on one of those.")
