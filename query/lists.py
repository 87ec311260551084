"""Inverted lists on demand: one list cache under one byte budget, shared by every request.

The cache owns the inverted lists of one faiss IVF (`ArrayInvertedLists`): a list is fetched by byte range the
first time a query probes it (`format.index_layout.fetch_lists`: coalesced, concurrent, checksum-verified;
one fetch per list however many requests want it), installed, and evicted again when the budget needs room,
so a search is always one faiss call over resident lists. A budget that holds the whole index is a cache that
never evicts.

Rows. Lists are numbered into one global row space (list 0's vectors first, in directory order), and faiss
holds each vector's global row as its label. Two row-indexed arrays live in anonymous memory maps, so only
the pages of resident lists take memory: `row_ids` (segment id of each row; the extra last row is -1, so faiss's
"no result" -1 maps to -1) and, with refine, `vectors` (float16, for exact re-ranking). Eviction gives their
pages back (madvise DONTNEED) unless a resident neighbour list shares the page.

Bytes. A resident list is charged its faiss codes and ids plus every page it touches in the two maps (a page
two resident lists share is charged to both, so the charges bound the real memory). faiss does not give a
list's memory back when the list is emptied, so an evicted list's faiss bytes stay charged as `leaked` until a
compaction rebuilds the inverted lists from the resident ones. Resident + leaked bytes never exceed the budget.

Eviction. 2Q by default: a list enters on probation and is protected once a later search probes it again
(while resident, or soon after probation let it go); victims come from probation first, so lists a one-off
scan brought in leave before lists in use.
"lru" is there to compare against. Searches hold a read lock; eviction, installs and compaction
take the write lock (writers first), so no search ever reads a list being changed.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import faiss
import numpy as np

from bank_builder.format import BankRef, IndexEntry
from bank_builder.format.index_layout import MAX_GAP, ListLayout, fetch_lists
from query.disk_cache import DiskCache

log = logging.getLogger("refbank.query")

PAGE = mmap.PAGESIZE
DEFAULT_MEMORY_BYTES = 1 << 30
POLICIES = ("2q", "lru")


class BudgetTooSmall(ValueError):
    """The lists one search needs do not fit the cache's memory budget at the same time."""


@dataclass(frozen=True)
class CacheConfig:
    """Options of a list cache.

    memory_bytes: the byte budget of resident lists (codes, ids, refine vectors, and leaked faiss bytes);
    policy: "2q" (scan-resistant, default) or "lru"; max_gap: byte ranges of one object closer than this are
    fetched as one request; compact_at: fraction of the budget that leaked faiss bytes may take before the
    inverted lists are rebuilt from the resident ones."""

    memory_bytes: int = DEFAULT_MEMORY_BYTES
    policy: str = "2q"
    max_gap: int = MAX_GAP
    compact_at: float = 0.1

    def __post_init__(self) -> None:
        if self.memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {self.memory_bytes}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0.0 < self.compact_at <= 1.0:
            raise ValueError(f"compact_at must be in (0, 1], got {self.compact_at}")


class _RWLock:
    """Many readers or one writer; a waiting writer holds new readers back (installs are never starved)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = self._waiting = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _TwoQueue:
    """2Q over list numbers, by bytes. A list enters on probation (first in, first out); a list probed again while
    on probation, or fetched again soon after probation evicted it (its number is still among the `ghosts`),
    moves to the protected LRU. Victims come from probation first, so a scan of one-off lists only cycles
    probation; the protected segment keeps at most `protected_share` of the budget, its least recent lists
    going back to probation."""

    def __init__(self, charge: np.ndarray, budget: int, protected_share: float = 0.75) -> None:
        self.charge, self.cap = charge, int(protected_share * budget)
        mean = float(charge[charge > 0].mean()) if (charge > 0).any() else 1.0
        self.ghost_limit = max(16, int(budget / mean))  # about as many numbers as the budget holds lists
        self.probation: OrderedDict[int, None] = OrderedDict()
        self.protected: OrderedDict[int, None] = OrderedDict()
        self.ghosts: OrderedDict[int, None] = OrderedDict()
        self.protected_bytes = 0
        self._lock = threading.Lock()

    def touch(self, lists: np.ndarray) -> None:
        with self._lock:
            for l in lists.tolist():
                if l in self.probation:
                    del self.probation[l]
                    self._protect(l)
                elif l in self.protected:
                    self.protected.move_to_end(l)
            self._trim_protected()

    def insert(self, lists: np.ndarray) -> None:
        with self._lock:
            for l in lists.tolist():
                if self.ghosts.pop(l, "absent") is None:  # evicted from probation a moment ago: in use after all
                    self._protect(l)
                else:
                    self.probation[l] = None
            self._trim_protected()

    def victims(self, charge: np.ndarray, need: int, protect: np.ndarray) -> np.ndarray:
        """Lists to evict until their charges reach `need`: probation's oldest first, then protected's."""
        picked, freed = [], 0
        with self._lock:
            for segment in (self.probation, self.protected):
                for l in list(segment):
                    if freed >= need:
                        break
                    if not protect[l]:
                        del segment[l]
                        picked.append(l)
                        freed += int(charge[l])
                        if segment is self.protected:
                            self.protected_bytes -= int(charge[l])
                        else:
                            self.ghosts[l] = None
            while len(self.ghosts) > self.ghost_limit:
                self.ghosts.popitem(last=False)
        return np.array(picked, np.int64)

    def _protect(self, l: int) -> None:
        self.protected[l] = None
        self.protected_bytes += int(self.charge[l])

    def _trim_protected(self) -> None:
        while self.protected_bytes > self.cap and self.protected:
            l, _ = self.protected.popitem(last=False)
            self.protected_bytes -= int(self.charge[l])
            self.probation[l] = None


class _LRU:
    """Least recently used over list numbers (the baseline 2Q is measured against)."""

    def __init__(self) -> None:
        self.order: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()

    def touch(self, lists: np.ndarray) -> None:
        with self._lock:
            for l in lists.tolist():
                if l in self.order:
                    self.order.move_to_end(l)

    def insert(self, lists: np.ndarray) -> None:
        with self._lock:
            for l in lists.tolist():
                self.order[l] = None

    def victims(self, charge: np.ndarray, need: int, protect: np.ndarray) -> np.ndarray:
        picked, freed = [], 0
        with self._lock:
            for l in list(self.order):
                if freed >= need:
                    break
                if not protect[l]:
                    picked.append(l)
                    freed += int(charge[l])
            for l in picked:
                del self.order[l]
        return np.array(picked, np.int64)


@dataclass
class _Fetch:
    """A fetch in flight: set when done, with the error when it failed (every waiter sees it)."""

    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class ListCache:
    """The resident inverted lists of one index version, under `config.memory_bytes` (thread-safe).

    ivf: the trained IVF whose inverted lists this cache owns from now on; entry and directory: the index's
    manifest entry and list directory; disk: a disk tier to read lists from before the bank (lists fetched from
    the bank are kept there). Use `pinned(lists)` around every search of those lists."""

    def __init__(self, ref: BankRef, entry: IndexEntry, directory: np.ndarray, ivf: faiss.IndexIVF,
                 config: CacheConfig = CacheConfig(), disk: DiskCache | None = None) -> None:
        self.ref, self.entry, self.directory, self.ivf, self.config = ref, entry, directory, ivf, config
        self.disk = disk
        self.nlist, self.code_size = entry.nlist, entry.code_size
        self.layout = ListLayout(entry.code_size, entry.dim, entry.refine)
        counts = directory["count"].astype(np.int64)
        self.row_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self.row_start[-1])
        self._ids_map = mmap.mmap(-1, (total + 1) * 8)
        self.row_ids = np.frombuffer(self._ids_map, np.int64)
        self.row_ids[-1] = -1
        self._vec_map = mmap.mmap(-1, max(total * 2 * entry.dim, 1)) if entry.refine else None
        self.vectors = (np.frombuffer(self._vec_map, np.float16, total * entry.dim).reshape(total, entry.dim)
                        if entry.refine else None)
        self.faiss_bytes = counts * (self.code_size + 8)
        self.charge = self.faiss_bytes + self._pages(self.row_start, 8) + (
            self._pages(self.row_start, 2 * entry.dim) if entry.refine else 0)
        self.whole_bytes = int(self.charge.sum())
        self.never_evicts = self.whole_bytes <= config.memory_bytes
        self.resident = np.zeros(self.nlist, bool)
        self.invlists = faiss.ArrayInvertedLists(self.nlist, self.code_size)
        self.ivf.replace_invlists(self.invlists, False)  # self.invlists keeps it alive
        self.policy = _TwoQueue(self.charge, config.memory_bytes) if config.policy == "2q" else _LRU()
        self._rw, self._lock = _RWLock(), threading.Lock()
        self._inflight: dict[int, _Fetch] = {}
        self.resident_bytes = self.leaked_bytes = 0
        self._counts = {"hits": 0, "misses": 0, "fetch_requests": 0, "bytes_fetched": 0, "evictions": 0,
                        "compactions": 0, "fetch_seconds": 0.0}
        self.access = np.zeros(self.nlist, np.int64)  # probes per list since open (prefetch order, heat)

    @staticmethod
    def _pages(row_start: np.ndarray, width: int) -> np.ndarray:
        """Bytes of the pages each list's rows touch in a row-indexed map of `width` bytes per row."""
        start, end = row_start[:-1] * width, row_start[1:] * width
        pages = np.where(end > start, (end - 1) // PAGE - start // PAGE + 1, 0)
        return pages * PAGE

    # ------------------------------------------------------------------------------------- searching side

    @contextmanager
    def pinned(self, lists: np.ndarray) -> Iterator[None]:
        """Hold `lists` (any shape, -1 ignored) resident for the block: fetches what is missing first (once per
        list across threads), then holds the read lock so nothing is evicted while the caller searches.
        BudgetTooSmall when these lists alone exceed the budget."""
        wanted = lists[lists >= 0]
        self.access[wanted] += 1  # approximate under concurrency: it only orders prefetching
        if self.never_evicts:  # nothing is ever evicted or moved: searches need no lock
            self._count_hits(wanted)
            yield
            return
        for _ in range(100):
            present = self._count_hits(wanted)
            with self._rw.read():
                if self.resident[wanted].all():  # else another request evicted one meanwhile: fetch again
                    self.policy.touch(wanted[present])  # hits only: a list just fetched stays on probation
                    yield
                    return
        raise BudgetTooSmall(f"the lists of this search keep being evicted by concurrent searches; the memory "
                             f"budget ({self.config.memory_bytes} bytes) is too small for this load")

    def _count_hits(self, wanted: np.ndarray) -> np.ndarray:
        """Fetch the lists of `wanted` that are not resident; count the probes served from memory. Returns the
        mask of `wanted` that was resident."""
        present = self.resident[wanted]
        if not present.all():
            self._ensure(np.unique(wanted[~present]), np.unique(wanted))
        with self._lock:
            self._counts["hits"] += int(present.sum())
        return present

    def _ensure(self, missing: np.ndarray, lists: np.ndarray) -> None:
        """Fetch and install the lists of `missing` (a subset of a search's `lists`) that are still not
        resident; waits for the fetches other threads own. Raises what a fetch it waited for raised."""
        need = int(self.charge[lists].sum())
        if need > self.config.memory_bytes:
            raise BudgetTooSmall(f"this search probes {len(lists)} lists needing {need} bytes, more than the list "
                                 f"cache's budget of {self.config.memory_bytes} bytes: raise the memory budget "
                                 "or lower nprobe / the batch size")
        mine, theirs = [], []
        with self._lock:
            for l in missing[~self.resident[missing]].tolist():
                if l in self._inflight:
                    theirs.append(self._inflight[l])
                else:
                    self._inflight[l] = _Fetch()
                    mine.append(l)
            self._counts["misses"] += len(mine)
        if mine:
            self._fetch_and_install(np.array(mine, np.int64), protect=lists)
        for fetch in theirs:
            fetch.done.wait()
            if fetch.error is not None:
                raise fetch.error

    def _fetch_and_install(self, lists: np.ndarray, protect: np.ndarray) -> None:
        """Fetch `lists` (this thread owns their in-flight records) and install them; every waiter is woken,
        with the error when one happened."""
        error: BaseException | None = None
        try:
            data = self._read(lists.tolist())
            with self._rw.write():
                self._make_room(int(self.charge[lists].sum()), protect)
                for l in lists.tolist():
                    self._install(l, data[l])
                with self._lock:
                    self.resident[lists] = True
                    self.resident_bytes += int(self.charge[lists].sum())
                self.policy.insert(lists)
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._lock:
                for l in lists.tolist():
                    fetch = self._inflight.pop(l)
                    fetch.error = error
                    fetch.done.set()

    def _read(self, lists: list[int]) -> dict[int, bytes]:
        """The verified bytes of `lists`: from the disk tier where it has them, the rest from the bank in one
        batch of ranged reads (then kept on disk)."""
        data, keys = {}, {}
        if self.disk is not None:
            for l in lists:
                if self.directory["count"][l]:
                    keys[l] = self.directory["checksum"][l].astype("<u8").tobytes().hex()
                    found = self.disk.get(keys[l])
                    if found is not None:
                        data[l] = found
        rest = [l for l in lists if l not in data]
        if rest:
            start = time.perf_counter()
            fetched = fetch_lists(self.ref, self.entry, self.directory, rest, self.config.max_gap)
            with self._lock:
                self._counts["fetch_requests"] += fetched.requests
                self._counts["bytes_fetched"] += fetched.bytes_read
                self._counts["fetch_seconds"] += time.perf_counter() - start
            data.update(fetched.lists)
            for l in rest:
                if l in keys:
                    self.disk.put(keys[l], fetched.lists[l])
        return data

    def _install(self, l: int, data: bytes) -> None:
        """Put list l's codes into faiss (labels = its global rows) and its ids / vectors into the maps."""
        count = int(self.directory["count"][l])
        if not count:
            return
        arrays = self.layout.decode(data, count)
        rows = np.arange(self.row_start[l], self.row_start[l + 1], dtype=np.int64)
        self.invlists.add_entries(l, count, faiss.swig_ptr(rows), faiss.swig_ptr(np.ascontiguousarray(arrays.codes)))
        self.row_ids[rows[0]:rows[-1] + 1] = arrays.ids
        if self.vectors is not None:
            self.vectors[rows[0]:rows[-1] + 1] = arrays.vectors

    # ------------------------------------------------------------------------------------- eviction

    def _make_room(self, need: int, protect_lists: np.ndarray) -> None:
        """Evict (and compact) until `need` more bytes fit the budget; write lock held."""
        budget = self.config.memory_bytes
        if self.resident_bytes + self.leaked_bytes + need <= budget:
            return
        protect = np.zeros(self.nlist, bool)
        protect[protect_lists] = True
        over = self.resident_bytes + self.leaked_bytes + need - budget
        victims = self.policy.victims(self.charge, over, protect)
        self._evict(victims)
        if self.leaked_bytes > self.config.compact_at * budget or \
                self.resident_bytes + self.leaked_bytes + need > budget:
            self._compact()
        if self.resident_bytes + need > budget:  # the protected lists alone leave no room
            raise BudgetTooSmall(f"{need} more bytes do not fit the list cache's budget of {budget} bytes beside "
                                 f"the {self.resident_bytes} bytes this search holds; raise the memory budget")

    def _evict(self, victims: np.ndarray) -> None:
        if not len(victims):
            return
        with self._lock:
            self.resident[victims] = False
            self.resident_bytes -= int(self.charge[victims].sum())
            self.leaked_bytes += int(self.faiss_bytes[victims].sum())
            self._counts["evictions"] += len(victims)
        for l in victims.tolist():
            self.invlists.resize(l, 0)  # faiss keeps the memory: counted as leaked until the next compaction
            self._release(self._ids_map, l, 8)
            if self._vec_map is not None:
                self._release(self._vec_map, l, 2 * self.entry.dim)

    def _release(self, m: mmap.mmap, l: int, width: int) -> None:
        """Give back the pages of list l's rows in a row map of `width` bytes per row that no other resident
        list touches (only the first and last page can be shared)."""
        start, end = int(self.row_start[l]) * width, int(self.row_start[l + 1]) * width
        if end <= start:
            return
        first, last = start // PAGE, (end - 1) // PAGE
        if self._page_used(first, width, l):
            first += 1
        if last >= first and self._page_used(last, width, l):
            last -= 1
        if last >= first:
            m.madvise(mmap.MADV_DONTNEED, first * PAGE, (last - first + 1) * PAGE)

    def _page_used(self, page: int, width: int, skip: int) -> bool:
        """Whether a resident list other than `skip` has rows on `page` of a map of `width` bytes per row."""
        lo_row, hi_row = page * PAGE // width, -(-(page + 1) * PAGE // width)
        lo = int(np.searchsorted(self.row_start, lo_row, side="right")) - 1
        hi = int(np.searchsorted(self.row_start, hi_row - 1, side="right")) - 1
        near = np.arange(max(lo, 0), min(hi, self.nlist - 1) + 1)
        near = near[(near != skip) & (self.directory["count"][near] > 0)]
        return bool(self.resident[near].any())

    def _compact(self) -> None:
        """Rebuild the inverted lists from the resident ones, giving faiss's leaked bytes back."""
        fresh = faiss.ArrayInvertedLists(self.nlist, self.code_size)
        for l in np.flatnonzero(self.resident).tolist():
            n = self.invlists.list_size(l)
            if n:
                fresh.add_entries(l, n, self.invlists.get_ids(l), self.invlists.get_codes(l))
        self.ivf.replace_invlists(fresh, False)
        self.invlists = fresh
        with self._lock:
            self.leaked_bytes = 0
            self._counts["compactions"] += 1

    # ------------------------------------------------------------------------------------- reporting

    def stats(self) -> dict[str, int | float]:
        """Counters since open: hits (probed lists found resident), misses (lists fetched),
        fetch_requests (ranged reads), bytes_fetched, fetch_seconds, evictions, compactions; gauges
        resident_bytes, leaked_bytes, resident_lists, memory_bytes, index_bytes (all lists resident)."""
        disk = self.disk.stats() if self.disk is not None else {}
        with self._lock:
            return {**self._counts, **disk, "fetch_seconds": round(self._counts["fetch_seconds"], 6),
                    "resident_bytes": self.resident_bytes, "leaked_bytes": self.leaked_bytes,
                    "resident_lists": int(self.resident.sum()), "memory_bytes": self.config.memory_bytes,
                    "index_bytes": self.whole_bytes}
