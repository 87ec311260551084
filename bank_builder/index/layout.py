"""Where an index lives under a bank, and the small storage helpers its stages share.

<bank>/index/<index-id>/trained.faissindex   the trained, empty index (plain faiss format: faiss.read_index)
<bank>/index/<index-id>/slices/<n>.npz       inverted lists [lo, hi) of slice n (numpy, no pickle)
<bank>/index/<index-id>/text.npz             the exact text index: unique labels + their text embeddings
<bank>/index/<index-id>/report.json          recall / latency curve, sizes, parameters, stage timings
<bank>/index/<index-id>/staging/<part>.bin   per-part add output, laid out by list; deleted once published

Object names in the manifest are relative to the index folder, so a bank can move between stores.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import threading
import time
from typing import Any

import numpy as np

from bank_builder import storage

TRAINED_OBJECT = "trained.faissindex"
TEXT_OBJECT = "text.npz"
REPORT_OBJECT = "report.json"


# np.load parses each .npy header with ast.literal_eval, whose AST recursion counter CPython 3.11/3.12 shares
# between threads (python/cpython gh-106905): concurrent parses fail at random with "AST constructor recursion
# depth mismatch". The query service loads slices from many threads, so header parsing is serialised here.
_NPZ_PARSE_LOCK = threading.Lock()


class IndexCorruptError(ValueError):
    """An index object on storage does not match the checksum or shape the manifest records."""


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an .npz object (no pickle), safe to call from many threads at once."""
    with _NPZ_PARSE_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def new_index_id() -> str:
    """A fresh, never-reused index id (UTC time + random suffix): objects of a published index never change."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def index_dir(bank: str, index_id: str) -> str:
    """URL of an index's folder."""
    return storage.join(bank, "index", index_id)


def slice_object(n: int) -> str:
    """Object name (relative to the index folder) of slice n."""
    return f"slices/{n:06d}.npz"


def staging_url(bank: str, index_id: str, part: str) -> str:
    """URL of a part's intermediate add output."""
    return storage.join(index_dir(bank, index_id), "staging", f"{part}.bin")


def sha256(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def write_object(bank: str, index_id: str, name: str, data: bytes, storage_options: dict[str, Any] | None) -> dict:
    """Write `data` as `name` under the index folder; returns its table entry {object, bytes, sha256}."""
    storage.write_bytes(storage.join(index_dir(bank, index_id), name), data, storage_options)
    return {"object": name, "bytes": len(data), "sha256": sha256(data)}


def read_object(bank: str, index_id: str, entry: dict, storage_options: dict[str, Any] | None,
                verify: bool = True) -> bytes:
    """The bytes of a manifest-listed object, checked against its recorded sha256."""
    url = storage.join(index_dir(bank, index_id), entry["object"])
    data = storage.read_bytes(url, storage_options)
    if verify and sha256(data) != entry["sha256"]:
        raise IndexCorruptError(
            f"{url} does not match the checksum in the manifest (object changed or truncated); "
            "rebuild the index with `refbank index`."
        )
    return data


def read_ranges(requests: list[tuple[str, int, int]], storage_options: dict[str, Any] | None) -> list[bytes]:
    """Bytes [start, end) of each (url, start, end), fetched concurrently where the store allows (s3fs)."""
    if not requests:
        return []
    fs, _ = storage.url_to_fs(requests[0][0], storage_options)
    paths = [storage.url_to_fs(url, storage_options)[1] for url, _, _ in requests]
    return list(fs.cat_ranges(paths, [r[1] for r in requests], [r[2] for r in requests]))


def remove_tree(url: str, storage_options: dict[str, Any] | None) -> None:
    """Delete a folder and everything under it (no error when it is already gone)."""
    fs, path = storage.url_to_fs(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
