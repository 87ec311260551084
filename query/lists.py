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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import faiss
import numpy as np

from bank_builder.format import BankRef, IndexEntry
from bank_builder.format.index_layout import MAX_GAP, ListLayout, fetch_lists, list_sources, read_directory
from bank_builder.format.tombstones import is_removed
from query.disk_cache import DiskCache
from query.eviction import POLICIES, make_policy

log = logging.getLogger("refbank.query")

PAGE = mmap.PAGESIZE
DEFAULT_MEMORY_BYTES = 1 << 30


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


def _private_map(size: int) -> mmap.mmap:
    """Anonymous private memory of `size` bytes: pages take memory once written and are freed (read back as
    zeros) by madvise(DONTNEED). Python's default anonymous map is shared, whose pages DONTNEED does not free."""
    return mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


@dataclass
class _Fetch:
    """A fetch in flight: set when done, with the error when it failed (every waiter sees it)."""

    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class ListCache:
    """The resident inverted lists of one index version, under `config.memory_bytes` (thread-safe).

    ivf: the trained IVF whose inverted lists this cache owns from now on; entry: the index's manifest entry
    (its directories are read once here); disk: a disk tier to read lists from before the bank (lists fetched
    from the bank are kept there); removed: sorted segment ids of the version's tombstones, left out of every
    list installed. Use `pinned(lists)` around every search of those lists."""

    def __init__(self, ref: BankRef, entry: IndexEntry, ivf: faiss.IndexIVF, config: CacheConfig = CacheConfig(),
                 disk: DiskCache | None = None, removed: np.ndarray | None = None) -> None:
        self.ref, self.entry, self.ivf, self.config, self.disk = ref, entry, ivf, config, disk
        self.sources = list_sources(entry)  # the base, then each delta: a list is their entries in this order
        self.directories = [read_directory(ref, entry, source) for source in self.sources]
        self.directory = self.directories[0]
        self.removed = np.zeros(0, np.int64) if removed is None else removed  # tombstoned ids: never installed
        self.nlist, self.code_size = entry.nlist, entry.code_size
        self.layout = ListLayout(entry.code_size, entry.dim, entry.refine)
        counts = sum(d["count"] for d in self.directories).astype(np.int64)
        self.counts = counts
        self.list_bytes = sum(d["bytes"] for d in self.directories).astype(np.int64)
        self.row_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self.row_start[-1])
        self._ids_map = _private_map((total + 1) * 8)
        self.row_ids = np.frombuffer(self._ids_map, np.int64)
        self.row_ids[-1] = -1
        self.faiss_bytes = counts * (self.code_size + 8)
        self.charge = self.faiss_bytes + self._pages(self.row_start, 8) + (
            self._pages(self.row_start, 2 * entry.dim) if entry.refine else 0)
        self.whole_bytes = int(self.charge.sum())
        self.never_evicts = self.whole_bytes <= config.memory_bytes
        self.store, self._vec_map, self.vectors = self._refine_rows(total, entry)
        self.resident = counts == 0  # an empty list has nothing to fetch: resident from the start
        self.complete = bool(self.resident.all())  # every list resident: searches need no residency check
        self.invlists = faiss.ArrayInvertedLists(self.nlist, self.code_size)
        self.ivf.replace_invlists(self.invlists, False)  # self.invlists keeps it alive
        self.policy = make_policy(config.policy, self.charge, config.memory_bytes)
        self._rw, self._lock = _RWLock(), threading.Lock()
        self._inflight: dict[int, _Fetch] = {}
        self.foreground = 0  # searches waiting on fetches now: a prefetcher holds back while any do
        self.resident_bytes = self.leaked_bytes = 0
        self._counts = {"hits": 0, "misses": 0, "fetch_requests": 0, "bytes_fetched": 0, "evictions": 0,
                        "compactions": 0, "fetch_seconds": 0.0}
        self.access = np.zeros(self.nlist, np.int64)  # probes per list since open (prefetch order, heat)

    def _refine_rows(self, total: int, entry: IndexEntry) -> tuple:
        """(faiss fp16 store or None, memory map or None, (total, dim) float16 rows or None) for refine vectors.

        A cache that never evicts keeps them in a faiss IndexScalarQuantizer (fp16), so a search re-ranks inside
        one faiss call (IndexRefine), as fast as a monolithic index; the budget holds all of them then. A cache
        that evicts keeps them in an anonymous memory map whose pages are given back list by list."""
        if not entry.refine:
            return None, None, None
        if self.never_evicts and total:
            store = faiss.IndexScalarQuantizer(entry.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            store.codes.resize(total * 2 * entry.dim)
            store.ntotal = total
            rows = faiss.rev_swig_ptr(store.codes.data(), total * 2 * entry.dim).view(np.float16)
            return store, None, rows.reshape(total, entry.dim)
        vec_map = _private_map(total * 2 * entry.dim)
        return None, vec_map, np.frombuffer(vec_map, np.float16, total * entry.dim).reshape(total, entry.dim)

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
            if self.complete:
                self.count_hits(wanted.size)
            else:
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

    def count_hits(self, probes: int) -> None:
        """Count `probes` probed lists served from memory (a search that needed no residency check)."""
        with self._lock:
            self._counts["hits"] += probes

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
        mine, theirs = self._claim(missing)
        with self._lock:
            self._counts["misses"] += len(mine)
            self.foreground += 1
        try:
            if mine:
                self._fetch_and_install(np.array(mine, np.int64), protect=lists)
            for fetch in theirs:
                fetch.done.wait()
                if fetch.error is not None:
                    raise fetch.error
        finally:
            with self._lock:
                self.foreground -= 1

    def _claim(self, lists: np.ndarray) -> tuple[list[int], list[_Fetch]]:
        """(the lists of `lists` this thread now fetches, the fetches in flight it waits for instead); resident
        lists are left out."""
        mine, theirs = [], []
        with self._lock:
            for l in lists[~self.resident[lists]].tolist():
                if l in self._inflight:
                    theirs.append(self._inflight[l])
                else:
                    self._inflight[l] = _Fetch()
                    mine.append(l)
        return mine, theirs

    def prefetch(self, lists: np.ndarray) -> int:
        """Fetch and install the lists of `lists` that are not resident, in order, as far as the free budget
        goes: never evicts (a prefetch only fills memory nothing else uses). Returns how many it installed."""
        with self._lock:
            free = self.config.memory_bytes - self.resident_bytes - self.leaked_bytes
            wanted = lists[~self.resident[lists]]
            fits = wanted[np.cumsum(self.charge[wanted]) <= free]
        mine, _ = self._claim(fits)
        if mine:
            self._fetch_and_install(np.array(mine, np.int64), protect=np.array(mine, np.int64), evict=False)
        return len(mine)

    def _fetch_and_install(self, lists: np.ndarray, protect: np.ndarray, evict: bool = True) -> None:
        """Fetch `lists` (this thread owns their in-flight records) and install them, evicting others for room
        unless `evict` is False (then lists that no longer fit are dropped); every waiter is woken, with the
        error when one happened."""
        error: BaseException | None = None
        claimed = lists
        try:
            data = self._read(lists.tolist())
            with self._rw.write():
                if evict:
                    self._make_room(int(self.charge[lists].sum()), protect)
                else:
                    free = self.config.memory_bytes - self.resident_bytes - self.leaked_bytes
                    lists = lists[np.cumsum(self.charge[lists]) <= free]
                for l in lists.tolist():
                    self._install(l, data[l])
                with self._lock:
                    self.resident[lists] = True
                    self.resident_bytes += int(self.charge[lists].sum())
                    self.complete = bool(self.resident.all())
                self.policy.insert(lists)
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._lock:
                for l in claimed.tolist():  # all of them: a list dropped for want of room wakes its waiters too
                    fetch = self._inflight.pop(l)
                    fetch.error = error
                    fetch.done.set()

    def _read(self, lists: list[int]) -> dict[int, list[bytes]]:
        """The verified bytes of `lists`, one piece per source (base, deltas) that holds entries of the list:
        from the disk tier where it has them, the rest from the bank in one batch of ranged reads per source
        (then kept on disk)."""
        pieces: dict[int, list[bytes]] = {l: [] for l in lists}
        for source, directory in zip(self.sources, self.directories):
            held = [l for l in lists if directory["count"][l]]
            data, keys = {}, {}
            for l in held if self.disk is not None else []:
                keys[l] = directory["checksum"][l].astype("<u8").tobytes().hex()
                found = self.disk.get(keys[l])
                if found is not None:
                    data[l] = found
            rest = [l for l in held if l not in data]
            if rest:
                start = time.perf_counter()
                fetched = fetch_lists(self.ref, self.entry, directory, rest, self.config.max_gap, source)
                with self._lock:
                    self._counts["fetch_requests"] += fetched.requests
                    self._counts["bytes_fetched"] += fetched.bytes_read
                    self._counts["fetch_seconds"] += time.perf_counter() - start
                data.update(fetched.lists)
                for l in rest if self.disk is not None else []:
                    self.disk.put(keys[l], fetched.lists[l])
            for l in held:
                pieces[l].append(data[l])
        return pieces

    def _install(self, l: int, pieces: list[bytes]) -> None:
        """Put list l's codes into faiss (labels = its global rows) and its ids / vectors into the row maps;
        tombstoned entries are left out."""
        counts = [int(d["count"][l]) for d in self.directories if d["count"][l]]
        if not counts:
            return
        decoded = [self.layout.decode(piece, count) for piece, count in zip(pieces, counts)]
        ids = np.concatenate([a.ids for a in decoded])
        codes = np.concatenate([a.codes for a in decoded])  # named: faiss reads through the pointer in the call
        rows = np.arange(self.row_start[l], self.row_start[l + 1], dtype=np.int64)
        keep = ~is_removed(self.removed, ids)
        if not keep.all():
            ids, codes, rows = ids[keep], np.ascontiguousarray(codes[keep]), rows[keep]
        self.invlists.add_entries(l, len(rows), faiss.swig_ptr(rows), faiss.swig_ptr(codes))
        self.row_ids[rows] = ids
        if self.vectors is not None:
            self.vectors[rows] = np.concatenate([a.vectors for a in decoded])[keep]

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
            self.complete = False
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
        """Whether a resident list other than `skip` has rows on `page` of a map of `width` bytes per row.
        Lists lie in row order, so only `skip`'s neighbours can share its edge pages: walk out from it."""
        start, end, rows = page * PAGE, (page + 1) * PAGE, self.row_start
        for step, inside in ((-1, lambda l: rows[l + 1] * width > start), (1, lambda l: rows[l] * width < end)):
            l = skip + step
            while 0 <= l < self.nlist and inside(l):
                if self.resident[l] and rows[l + 1] > rows[l]:
                    return True
                l += step
        return False

    def _compact(self) -> None:
        """Rebuild the inverted lists from the resident ones, giving faiss's leaked bytes back."""
        fresh = faiss.ArrayInvertedLists(self.nlist, self.code_size)
        # Evicted lists are empty: copying every list copies the resident ones, in one faiss call.
        self.invlists.copy_subset_to(fresh, faiss.InvertedLists.SUBSET_TYPE_INVLIST, 0, self.nlist)
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
