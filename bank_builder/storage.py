"""Object-storage access through fsspec: URLs in, bytes out, every write whole or not at all."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


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
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
