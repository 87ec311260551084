"""Which inverted lists the list cache evicts: 2Q (the default, scan-resistant) and LRU (the baseline).

A policy sees list numbers only: `insert` when lists are installed, `touch` when a search finds them resident,
and `victims` when the cache needs `need` bytes back (lists in `protect`, those of the search being served,
are never chosen). Both are thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

import numpy as np

POLICIES = ("2q", "lru")


class Policy(Protocol):
    def touch(self, lists: np.ndarray) -> None: ...

    def insert(self, lists: np.ndarray) -> None: ...

    def victims(self, charge: np.ndarray, need: int, protect: np.ndarray) -> np.ndarray: ...


def make_policy(name: str, charge: np.ndarray, budget: int) -> Policy:
    """The policy `name` ("2q" or "lru") for lists of `charge` bytes under `budget` bytes."""
    if name == "2q":
        return TwoQueue(charge, budget)
    if name == "lru":
        return LRU()
    raise ValueError(f"unknown eviction policy {name!r}; use one of {POLICIES}")


class TwoQueue:
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


class LRU:
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
