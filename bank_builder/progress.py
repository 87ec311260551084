"""Progress of a long build: counts, rates and an ETA from images, reported to a callback and to the console.

The ETA counts images, not shards: the shards of a run are listed with their stored sizes, every encoded batch
says how far into its shard's bytes it reached, so images per byte (and so the images still to come) is known
from the first batch on, long before the first shard commits. Rates leave out the start-up (the encoder
actors loading their models). On a terminal the console shows a bar (rich, which typer brings); otherwise a
plain line on each finished shard and at most every `interval_s` seconds between.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, TextIO


@dataclass
class BuildProgress:
    """Counters of one build run; rates count only work done in this run (skipped shards excluded).

    shard_bytes: stored bytes of each shard this run builds (from the listing; 0 when the store gave none)."""

    shards_total: int
    shards_skipped: int = 0
    shards_done: int = 0
    shards_failed: int = 0
    shard_retries: int = 0
    actor_restarts: int = 0
    encoder_calls: int = 0  # sent in this run; each carries one or more decoded chunks (bank_builder.batching)
    images: int = 0  # encoded in this run (a retried shard's images count again: they were encoded again)
    segments: int = 0  # encoded in this run
    rejects: int = 0
    captioned: int = 0  # encoded in this run with unlabelled segments and caption phrases for them
    shard_bytes: dict[str, int] = field(default_factory=dict)
    encoder_actors: list[str] = field(default_factory=list)  # names of the live encoder actors
    startup_s: float = 0.0  # until the first encoder actor had loaded its model
    started: float = field(default_factory=time.monotonic)
    _reached: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # shard → (bytes, images) so far
    _done_images: int = field(default=0, repr=False)  # images of the shards committed in this run

    def batch_encoded(self, shard: str, stats: dict[str, int]) -> None:
        """Count one encoded batch of `shard` (the encoder's stats: images, segments, stream_bytes, captioned)."""
        self.images += stats["images"]
        self.segments += stats["segments"]
        self.captioned += stats.get("captioned", 0)
        reached, images = self._reached.get(shard, (0, 0))
        self._reached[shard] = (max(reached, stats.get("stream_bytes", 0)), images + stats["images"])

    def shard_written(self, shard: str, rejects: int) -> None:
        """`shard` is committed: all its bytes are read."""
        self.shards_done += 1
        self.rejects += rejects
        images = self._reached.get(shard, (0, 0))[1]
        self._reached[shard] = (self.shard_bytes.get(shard, 0), images)
        self._done_images += images

    def shard_restarted(self, shard: str, failed: bool) -> None:
        """`shard`'s attempt was abandoned: it starts over (retry), or leaves the run (failed every attempt)."""
        self.shard_reset(shard)
        if failed:
            self.shards_failed += 1
            self.shard_bytes.pop(shard, None)
        else:
            self.shard_retries += 1

    def shard_reset(self, shard: str) -> None:
        """`shard` starts over without a failed attempt (its decode was stopped to free CPUs): forget its images."""
        self._reached.pop(shard, None)

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    @property
    def busy_s(self) -> float:
        """Seconds since the encoders were up: what the rates divide by."""
        return max(self.elapsed_s - self.startup_s, 1e-9)

    @property
    def images_per_s(self) -> float:
        """Images encoded per second in this run, start-up excluded."""
        return self.images / self.busy_s

    @property
    def segments_per_s(self) -> float:
        """Segments encoded per second in this run, start-up excluded."""
        return self.segments / self.busy_s

    @property
    def images_reached(self) -> int:
        """Images encoded of the shards' current attempts (what counts towards the end)."""
        return sum(images for _, images in self._reached.values())

    @property
    def images_expected(self) -> float | None:
        """Images this run encodes in all: images per stored byte so far × the run's bytes; None before a batch."""
        reached = sum(b for b, _ in self._reached.values())
        total = sum(self.shard_bytes.values())
        if reached and total:
            return max(self.images_reached * total / reached, self.images_reached)
        left = self.shards_total - self.shards_skipped - self.shards_failed
        if self.shards_done:  # sizes unknown: images per finished shard
            return max(self._done_images * left / self.shards_done, self.images_reached)
        return None

    @property
    def eta_s(self) -> float | None:
        """Seconds left: images still expected over the current rate; None before the first batch."""
        expected = self.images_expected
        if expected is None or not self.images:
            return None
        return max(expected - self.images_reached, 0) / self.images_per_s

    def line(self, short: bool = False) -> str:
        """One console line: shards, images (of those expected), segments, rejects, rates, ETA; `short` (beside
        a bar) leaves out segments and rejects."""
        eta = "?" if self.eta_s is None else str(timedelta(seconds=round(self.eta_s)))
        expected = self.images_expected
        of = f"/~{round(expected)}" if expected is not None else ""
        skipped = f" ({self.shards_skipped} skipped)" if self.shards_skipped else ""
        failed = f" {self.shards_failed} FAILED" if self.shards_failed else ""
        shards = f"shards {self.shards_done + self.shards_skipped}/{self.shards_total}{skipped}{failed}"
        images = f"images {self.images_reached}{of}"
        if short:
            return f"{images} | {shards} | {self.images_per_s:.1f} img/s | ETA {eta}"
        return (f"{shards} | {images} | segments {self.segments} | rejects {self.rejects} | "
                f"{self.images_per_s:.1f} img/s {self.segments_per_s:.1f} seg/s | ETA {eta}")


ProgressCallback = Callable[[BuildProgress], None]


class ConsolePrinter:
    """A ProgressCallback printing plain lines (for logs and pipes): one when a shard finishes, else at most
    one every `interval_s` seconds."""

    def __init__(self, interval_s: float = 10.0, stream: TextIO | None = None) -> None:
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self._last = time.monotonic()
        self._finished = 0

    def __call__(self, progress: BuildProgress) -> None:
        now, finished = time.monotonic(), progress.shards_done + progress.shards_failed
        if finished != self._finished or now - self._last >= self.interval_s:
            self._last, self._finished = now, finished
            print(f"[build] {progress.line()}", file=self.stream, flush=True)


class ProgressBar:
    """A ProgressCallback drawing a rich bar on a terminal: images of those expected, and the same counts,
    rates and ETA as the plain line. Use as a context manager (the bar is drawn between enter and exit)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self._bar = Progress(TextColumn("[build]"), BarColumn(bar_width=24), TextColumn("{task.fields[line]}"),
                             console=Console(file=stream or sys.stderr), transient=False)
        self._task = self._bar.add_task("build", total=None, line="starting the encoders")

    def __enter__(self) -> ProgressBar:
        self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.stop()

    def __call__(self, progress: BuildProgress) -> None:
        expected = progress.images_expected
        self._bar.update(self._task, completed=progress.images_reached,
                         total=None if expected is None else max(expected, 1), line=progress.line(short=True))


@contextmanager
def console_progress(interval_s: float = 10.0, stream: TextIO | None = None) -> Iterator[ProgressCallback]:
    """The console's ProgressCallback: a bar when `stream` (default stderr) is a terminal, else plain lines."""
    stream = stream or sys.stderr
    if stream.isatty():
        with ProgressBar(stream) as bar:
            yield bar
    else:
        yield ConsolePrinter(interval_s, stream)
