"""Admission control of the query service: bounded worker pools with a queue limit.

Each kind of work has its own pool, so a heavy request never holds the threads a light one needs: images
(`/v1/segment`, image `/v1/search`: decode, regions, encoder forward, result at the request's size) and queries
(text / vector search, `/v1/bank`, `/v1/labels`). A pool runs at most `workers` calls at once and lets at most
`queue` more wait; a request beyond that is refused at once with 429 and a Retry-After estimated from the pool's
recent call times. Requests are admitted once their (bounded) body is read, so a slow upload holds a connection,
never a place. A refused request costs the server no work, so overload degrades into fast refusals instead of a
growing backlog that every later request waits behind.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from query.serving import ApiError

MAX_RETRY_AFTER_S = 60  # the longest Retry-After a refusal suggests


@dataclass(frozen=True)
class PoolConfig:
    """workers: calls running at once (threads); queue: admitted calls allowed to wait for a thread."""

    workers: int
    queue: int

    def __post_init__(self) -> None:
        if self.workers < 1 or self.queue < 0:
            raise ValueError(f"a pool needs workers >= 1 and queue >= 0, got workers={self.workers}, "
                             f"queue={self.queue}")


class WorkPool:
    """A bounded thread pool with admission: `async with pool.admit() as run: ... await run(fn, *args)`.

    `admit` refuses (ApiError 429 "overloaded", Retry-After) when `workers + queue` requests are already admitted;
    an admitted request keeps its place until its call returns, even if the client goes away meanwhile (the
    thread cannot be stopped), and gives it back at once if it never submits a call."""

    def __init__(self, name: str, config: PoolConfig) -> None:
        self.name, self.config = name, config
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix=f"refbank-{name}")
        self._lock = threading.Lock()
        self._admitted = self._running = 0
        self._durations: deque[float] = deque(maxlen=32)  # seconds of the latest calls, for Retry-After
        self.refused = self.completed = 0

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
        """Reserve a place (429 when full); yields `run(fn, *args)`, which runs fn on the pool's threads."""
        with self._lock:
            if self._admitted >= self.config.workers + self.config.queue:
                self.refused += 1
                retry = self._retry_after()
                raise ApiError(429, "overloaded", f"the server is busy with {self._admitted} {self.name} requests "
                                                  f"(at most {self.config.workers} at once and {self.config.queue} "
                                                  f"waiting); retry in {retry} s", headers={"Retry-After": str(retry)})
            self._admitted += 1
        submitted: list[Future] = []

        async def run(fn: Callable[..., Any], *args: Any) -> Any:
            future = self._executor.submit(self._call, fn, *args)
            submitted.append(future)
            future.add_done_callback(self._release)  # also when cancelled before it started
            return await asyncio.wrap_future(future)

        try:
            yield run
        finally:
            if not submitted:
                self._release(None)

    def stats(self) -> dict[str, int]:
        """running, queued (admitted, not yet on a thread), refused and completed calls, workers, queue limit."""
        with self._lock:
            return {"running": self._running, "queued": self._admitted - self._running, "refused": self.refused,
                    "completed": self.completed, "workers": self.config.workers, "queue": self.config.queue}

    def shutdown(self) -> None:
        """Stop taking calls; the running ones finish."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            self._running += 1
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._running -= 1
                self._durations.append(time.perf_counter() - start)

    def _release(self, future: Future | None) -> None:
        with self._lock:
            self._admitted -= 1
            self.completed += future is not None and not future.cancelled()

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the waiting calls' share of the recent mean call time."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        waves = (self._admitted - self.config.workers) / self.config.workers + 1
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(mean * waves)))
