"""The list cache's local disk tier: list bytes by content address, under a byte limit.

A file `<folder>/<checksum>.list` holds one inverted list's bytes, named by the list's checksum (sha256, 16 bytes) from
the index directory, so a file is never mistaken for another list (of this index, another version or another
bank), several processes can share a folder (files appear by atomic rename), and a list that did not change
between two versions is fetched from the bank once. Every read is checked against its name; a damaged file is
removed and the list fetched again. Beyond `max_bytes`, the least recently used files are deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("refbank.query")

SUFFIX = ".list"


class DiskCache:
    """Verified list bytes on local disk under `max_bytes` (thread-safe)."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the disk cache's byte limit must be >= 0, got {max_bytes}")
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # checksum → bytes, least recently used first
        found = sorted(((p.stat().st_mtime, p.stem, p.stat().st_size) for p in self.folder.glob(f"*{SUFFIX}")))
        for _, key, size in found:
            self._files[key] = size
        self.bytes = sum(self._files.values())
        self._counts = {"disk_hits": 0, "disk_writes": 0, "disk_evictions": 0, "disk_corrupt": 0}
        self._trim()

    def get(self, key: str) -> bytes | None:
        """The bytes stored under checksum `key` (hex), or None when absent or damaged (then removed)."""
        path = self.folder / f"{key}{SUFFIX}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).digest()[:16].hex() != key:
            log.warning("disk-cached list %s does not match its checksum; removed, fetching it again", path.name)
            self._forget(key, path)
            with self._lock:
                self._counts["disk_corrupt"] += 1
            return None
        with self._lock:
            self._files[key] = len(data)
            self._files.move_to_end(key)
            self._counts["disk_hits"] += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        """Keep `data` under checksum `key`; a full or read-only disk only costs a fetch later."""
        if len(data) > self.max_bytes:
            return
        path = self.folder / f"{key}{SUFFIX}"
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)  # whole or absent: a crash mid-write leaves only a temp file
        except OSError as exc:
            log.warning("cannot keep %s in the disk cache (%s)", path.name, exc)
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self.bytes += len(data) - self._files.get(key, 0)
            self._files[key] = len(data)
            self._files.move_to_end(key)
            self._counts["disk_writes"] += 1
        self._trim()

    def stats(self) -> dict[str, int]:
        """disk_hits, disk_writes, disk_evictions, disk_corrupt; gauges disk_bytes, disk_limit_bytes."""
        with self._lock:
            return {**self._counts, "disk_bytes": self.bytes, "disk_limit_bytes": self.max_bytes}

    def _trim(self) -> None:
        """Delete least recently used files until the folder holds at most max_bytes."""
        while True:
            with self._lock:
                if self.bytes <= self.max_bytes or not self._files:
                    return
                key, size = self._files.popitem(last=False)
                self.bytes -= size
                self._counts["disk_evictions"] += 1
            (self.folder / f"{key}{SUFFIX}").unlink(missing_ok=True)

    def _forget(self, key: str, path: Path) -> None:
        path.unlink(missing_ok=True)
        with self._lock:
            self.bytes -= self._files.pop(key, 0)
