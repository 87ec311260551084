"""Progress of a long build: counts, rates and ETA, reported to a callback and to the console."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, TextIO


@dataclass
class BuildProgress:
    """Counters of one build run; rates count only work done in this run (skipped shards excluded)."""

    shards_total: int
    shards_skipped: int = 0
    shards_done: int = 0
    shards_failed: int = 0
    shard_retries: int = 0
    actor_restarts: int = 0
    images: int = 0  # encoded in this run
    segments: int = 0  # encoded in this run
    rejects: int = 0
    images_in_done_shards: int = 0
    encoder_actors: list[str] = field(default_factory=list)  # names of the live encoder actors
    startup_s: float = 0.0  # until every encoder actor had loaded its model
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    @property
    def images_per_s(self) -> float:
        """Images encoded per second in this run."""
        return self.images / max(self.elapsed_s, 1e-9)

    @property
    def segments_per_s(self) -> float:
        """Segments encoded per second in this run."""
        return self.segments / max(self.elapsed_s, 1e-9)

    @property
    def eta_s(self) -> float | None:
        """Seconds left, from the images per finished shard and the current rate; None before a shard finishes."""
        if not self.shards_done or not self.images:
            return None
        remaining = self.shards_total - self.shards_skipped - self.shards_done - self.shards_failed
        images_left = max(remaining * self.images_in_done_shards / self.shards_done - self._in_flight_images(), 0)
        return images_left / self.images_per_s

    def _in_flight_images(self) -> int:
        return self.images - self.images_in_done_shards

    def line(self) -> str:
        """One console line: shards, samples, segments, rejects, rates, ETA."""
        eta = "?" if self.eta_s is None else str(timedelta(seconds=round(self.eta_s)))
        skipped = f" ({self.shards_skipped} skipped)" if self.shards_skipped else ""
        failed = f" {self.shards_failed} FAILED" if self.shards_failed else ""
        return (
            f"shards {self.shards_done + self.shards_skipped}/{self.shards_total}{skipped}{failed} | "
            f"images {self.images} | segments {self.segments} | rejects {self.rejects} | "
            f"{self.images_per_s:.1f} img/s {self.segments_per_s:.1f} seg/s | ETA {eta}"
        )


ProgressCallback = Callable[[BuildProgress], None]


class ConsolePrinter:
    """A ProgressCallback that prints a line at most every `interval_s` seconds."""

    def __init__(self, interval_s: float = 2.0, stream: TextIO | None = None) -> None:
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self._last = 0.0

    def __call__(self, progress: BuildProgress) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            print(f"[build] {progress.line()}", file=self.stream, flush=True)
