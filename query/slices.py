"""Index slices on demand: fetched on first use, kept on local disk, held in memory under a byte budget.

Three tiers, each checked against the sha256 the manifest records:
  memory  decoded slices, least recently used evicted first so resident bytes never exceed the budget;
  disk    <cache_dir>/<sha256><suffix>: named by content, so a file of another index or version is never
          mistaken for this one, and one cache dir can serve every version of a bank (and several processes:
          files appear by atomic rename);
  bank    the object on storage.
Concurrent requests for one slice share one load (a future per slice), so a cold slice is fetched once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from bank_builder.index import layout
from bank_builder.index.slices import SliceArrays
from query.bank import Bank

log = logging.getLogger("refbank.query")

DEFAULT_MEMORY_BYTES = 1 << 30
Prepare = Callable[[int], tuple[Any, int]]  # slice number → (the value to keep in memory, its size in bytes)


class SliceCache:
    """Slices of one bank version's index (thread-safe). Called as `cache(n)`, it is a `SliceLoader` for
    `SlicedIndex` (pass max_resident=0 there: the cache holds the memory); `BankSearcher` keeps search-ready
    slices in it instead, through `get`. One cache serves one consumer; caches may share a `cache_dir`.

    cache_dir: local folder for the disk tier (None: no disk tier). memory_bytes: budget of the memory tier;
    a slice larger than the whole budget is served but not kept."""

    def __init__(self, bank: Bank, cache_dir: str | os.PathLike | None = None,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if not bank.index:
            raise ValueError(f"bank {bank.uri} version {bank.version} has no index; run `refbank index` first")
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        self.bank, self.index, self.memory_bytes = bank, bank.index, memory_bytes
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[int, tuple[Any, int]] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._prepare: Prepare | None = None
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "fetches": 0, "bytes_fetched": 0, "disk_hits": 0,
                        "disk_corrupt": 0, "evictions": 0, "oversize": 0, "resident_bytes": 0}
        self._fetch_seconds = 0.0

    def __call__(self, n: int) -> SliceArrays:
        """Slice n as SliceArrays, from memory when resident (the `SliceLoader` interface)."""
        return self.get(n, self._sized_arrays)

    def get(self, n: int, prepare: Prepare) -> Any:
        """Slice n as `prepare(n)` made it: from memory when resident, else prepared once however many
        threads ask at the same time (a failure reaches every waiter and leaves nothing cached)."""
        with self._lock:
            self._bind(prepare)
            if n in self._memory:
                self._memory.move_to_end(n)
                self._counts["hits"] += 1
                return self._memory[n][0]
            pending = self._pending.get(n)
            owner = pending is None
            if owner:
                pending = self._pending[n] = Future()
            self._counts["misses" if owner else "hits"] += 1
        if not owner:
            return pending.result()
        try:
            value, nbytes = prepare(n)
        except BaseException as e:
            with self._lock:
                del self._pending[n]
            pending.set_exception(e)
            raise
        with self._lock:
            self._keep(n, value, nbytes)
            del self._pending[n]
        pending.set_result(value)
        return value

    def note_hit(self) -> None:
        """Count a request served from memory that never asked for a slice (a whole-index search, which
        touches only slices already installed)."""
        with self._lock:
            self._counts["hits"] += 1

    def arrays(self, n: int) -> SliceArrays:
        """Slice n parsed from the disk tier or the bank (not kept in memory: that is `get`'s job)."""
        return SliceArrays.from_bytes(self.read(self.index["slices"][n]))

    def read(self, entry: dict) -> bytes:
        """The verified bytes of a manifest-listed object of this index ({object, bytes, sha256}): the disk
        copy when one is there and intact, else the bank's (then written to disk). Raises IndexCorruptError
        when the bank's object does not match its checksum; nothing is cached then."""
        path = self._disk_path(entry)
        if path is not None and path.exists():
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() == entry["sha256"]:
                with self._lock:
                    self._counts["disk_hits"] += 1
                return data
            # A damaged local copy is the disk's fault, not the bank's: drop it and fetch the object again.
            log.warning("cached %s does not match its sha256; removed, fetching %s again", path, entry["object"])
            path.unlink(missing_ok=True)
            with self._lock:
                self._counts["disk_corrupt"] += 1
        start = time.perf_counter()
        data = layout.read_object(self.bank.uri, self.index["id"], entry, self.bank.storage_options)
        with self._lock:
            self._counts["fetches"] += 1
            self._counts["bytes_fetched"] += len(data)
            self._fetch_seconds += time.perf_counter() - start
        if path is not None:
            self._write_disk(path, data)
        return data

    def resident(self) -> list[int]:
        """Slice numbers held in memory, least recently used first."""
        with self._lock:
            return list(self._memory)

    def stats(self) -> dict[str, int | float]:
        """Counters since creation: hits / misses of the memory tier (a request that joins a load already in
        flight is a hit; so is a whole-index search that fetched nothing), fetches and bytes_fetched from the
        bank, disk_hits, disk_corrupt (damaged local copies replaced), evictions, oversize (slices served but
        too big to keep), fetch_seconds; gauges resident_bytes, resident_slices, memory_bytes."""
        with self._lock:
            return {**self._counts, "resident_slices": len(self._memory), "memory_bytes": self.memory_bytes,
                    "fetch_seconds": round(self._fetch_seconds, 6)}

    def _sized_arrays(self, n: int) -> tuple[SliceArrays, int]:
        arrays = self.arrays(n)
        vectors = 0 if arrays.vectors is None else arrays.vectors.nbytes
        return arrays, arrays.offsets.nbytes + arrays.ids.nbytes + arrays.codes.nbytes + vectors

    def _bind(self, prepare: Prepare) -> None:
        """Tie the cache to its first consumer: values of two kinds under one slice number would be mixed up."""
        if self._prepare is None:
            self._prepare = prepare
        elif prepare != self._prepare:
            raise ValueError("this SliceCache already holds slices for another consumer; give each SlicedIndex "
                             "or BankSearcher its own SliceCache (they may share cache_dir)")

    def _keep(self, n: int, value: Any, nbytes: int) -> None:
        """Hold `value` as slice n, evicting least recently used slices to stay within the budget (lock held)."""
        if nbytes > self.memory_bytes:
            if not self._counts["oversize"]:  # once: a budget below the slice size is a setting to fix, not news
                log.warning("slice %d needs %d bytes, more than the whole memory budget (%d): served, not kept; "
                            "raise memory_bytes above the largest slice", n, nbytes, self.memory_bytes)
            self._counts["oversize"] += 1
            return
        self._memory[n] = (value, nbytes)
        self._counts["resident_bytes"] += nbytes
        while self._counts["resident_bytes"] > self.memory_bytes:
            _, (_, freed) = self._memory.popitem(last=False)
            self._counts["resident_bytes"] -= freed
            self._counts["evictions"] += 1

    def _write_disk(self, path: Path, data: bytes) -> None:
        """Keep a verified object on disk; a full or read-only disk only costs the next process a fetch."""
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)  # whole or absent: a crash mid-write leaves only a temp file
        except OSError as e:
            log.warning("cannot keep %s in the disk cache (%s); serving it from memory only", path.name, e)
            tmp.unlink(missing_ok=True)

    def _disk_path(self, entry: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / (entry["sha256"] + Path(entry["object"]).suffix)
