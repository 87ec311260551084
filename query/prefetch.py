"""Warm-up without delay: after a version opens, a background thread fills the list cache's free budget with
the lists most likely to be probed — the hottest by the access counts of earlier runs (kept in a small file
beside the disk cache), else the largest — and holds back whenever a request is waiting on a fetch.

It never evicts (ListCache.prefetch only uses free budget), so it cannot push out what requests brought in.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path

import numpy as np

from query.lists import ListCache

log = logging.getLogger("refbank.query")

BATCH = 8  # lists per prefetch step: small, so a request that wants one of them waits little
IDLE_WAIT_S = 0.01  # how often a held-back prefetcher looks again


class Prefetcher:
    """Prefetches `cache`'s lists in heat order in a daemon thread; `save_heat` keeps the access counts.

    heat_file: where access counts persist between runs (None: no persistence, largest lists first)."""

    def __init__(self, cache: ListCache, heat_file: str | os.PathLike | None = None) -> None:
        self.cache, self.heat_file = cache, Path(heat_file) if heat_file is not None else None
        self.previous = self._load()
        self.installed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refbank-prefetch", daemon=True)

    def order(self) -> np.ndarray:
        """List numbers, most likely probed first: by persisted heat, ties (and no heat) by size."""
        sizes = self.cache.list_bytes
        return np.lexsort((-sizes, -self.previous))

    def start(self) -> Prefetcher:
        """Start the background thread; returns self."""
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until prefetching has finished (the budget is full or every list is in); True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop prefetching (a batch in flight finishes) and keep the access counts."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.save_heat()

    def save_heat(self) -> None:
        """Write the access counts (earlier runs' + this one's) next to the cache, atomically."""
        if self.heat_file is None:
            return
        heat = self.previous + self.cache.access
        tmp = self.heat_file.with_name(f"{self.heat_file.name}.tmp-{uuid.uuid4().hex}")
        try:
            self.heat_file.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, heat, allow_pickle=False)
            os.replace(tmp, self.heat_file)
        except OSError as exc:
            log.warning("cannot keep list access counts in %s (%s)", self.heat_file, exc)
            tmp.unlink(missing_ok=True)

    def _load(self) -> np.ndarray:
        counts = np.zeros(self.cache.nlist, np.int64)
        if self.heat_file is None or not self.heat_file.exists():
            return counts
        try:
            saved = np.load(self.heat_file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable access counts %s (%s)", self.heat_file, exc)
            return counts
        if saved.shape != counts.shape or saved.dtype.kind not in "iu":
            log.warning("ignoring access counts %s: they are not of this index", self.heat_file)
            return counts
        return saved.astype(np.int64)

    def _run(self) -> None:
        order = self.order()
        for start in range(0, len(order), BATCH):
            while self.cache.foreground and not self._stop.is_set():  # requests first
                self._stop.wait(IDLE_WAIT_S)
            if self._stop.is_set():
                return
            try:
                done = self.cache.prefetch(order[start:start + BATCH])
            except Exception as exc:  # a prefetch is a nicety: a failure is logged, requests report their own
                log.warning("prefetch stopped: %s", exc)
                return
            self.installed += done
            if not done and not self._fits_any(order[start:]):
                return  # the budget is full: nothing more fits without evicting

    def _fits_any(self, rest: np.ndarray) -> bool:
        cache = self.cache
        free = cache.config.memory_bytes - cache.resident_bytes - cache.leaked_bytes
        wanted = rest[~cache.resident[rest]]
        return bool(len(wanted)) and int(cache.charge[wanted].min()) <= free
