"""The build's Ray driver loop: shards through decode tasks → encoder actors → part writers, with bounded
memory, retries per shard, and encoder actors replaced when they (or their node) die.

The driver handles chunks of batches, never single images; an encoder call carries as many waiting chunks as
the measured forward time asks for (`batching.CallSizer`), possibly of several shards. It collects every event
that is ready in one pass (one blocking `ray.wait`, then one that returns all ready refs, one `ray.get` of all
ready stats), so its own cost per image falls as calls grow (BENCHMARKS.md, "Driver scale").
"""

from __future__ import annotations

import importlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError

from bank_builder.batching import CallSizer, chunk_batches
from bank_builder.config import BuildConfig
from bank_builder.encoder_pool import EncoderPool, EncoderWorker, Placement, plan_placement
from bank_builder.encoders import EncoderSpec
from bank_builder.format import PartEntry
from bank_builder.prepare import InputGeometry
from bank_builder.progress import BuildProgress, ProgressCallback
from bank_builder.workers import decode_shard, write_shard

log = logging.getLogger("refbank.build")

STALL_CHECK_S = 1.0  # how often a driver with no ready encoder asks whether Ray is still placing lost bundles


@dataclass
class ShardFailure:
    """A shard that failed every attempt, with the last error."""

    shard: str
    error: str


@dataclass
class _ShardRun:
    """Driver-side state of one shard."""

    info: PartEntry
    attempt: int = 0  # bumped at every restart; outputs of older attempts are ignored
    failures: int = 0  # attempts that failed (a restart forced by a stalled pool is not one)
    gen: Any = None
    held: ray.ObjectRef | None = None  # the newest generator output; it is the ShardTail if the generator ends next
    tail: ray.ObjectRef | None = None
    chunks: int = 0
    encoded: dict[int, tuple[ray.ObjectRef, int]] = field(default_factory=dict)  # chunk → (call output, place in it)

    def reset(self) -> None:
        """Forget the current attempt's outputs and start counting the next one."""
        self.attempt += 1
        self.gen, self.held, self.tail, self.chunks, self.encoded = None, None, None, 0, {}


def _stages(stand_in: str | None) -> tuple[Callable[..., Any], type]:
    """(decode_shard, EncoderWorker): the real ones, or a benchmark's stand-ins from the module `stand_in`."""
    module = importlib.import_module(stand_in) if stand_in else None
    return (getattr(module, "decode_shard", decode_shard), getattr(module, "EncoderWorker", EncoderWorker))


@dataclass
class _Chunk:
    """A decoded chunk waiting for an encoder call. alone: it failed in a call with others, so it goes alone next,
    and an error then is its shard's own."""

    run: _ShardRun
    attempt: int
    index: int  # its place in the shard
    ref: ray.ObjectRef
    alone: bool = False

    @property
    def current(self) -> bool:
        """False once its shard's attempt was abandoned."""
        return self.attempt == self.run.attempt


class Driver:
    """The event loop: bounded shards in flight, bounded calls queued per actor, retries per shard.
    `config.pipeline.batch_size` must be resolved (`batching.resolve_batch_size`)."""

    def __init__(self, config: BuildConfig, spec: EncoderSpec, todo: list[PartEntry],
                 progress: BuildProgress, on_progress: ProgressCallback | None,
                 placement: Placement | None = None) -> None:
        self.config, self.spec, self.progress, self.on_progress = config, spec, progress, on_progress
        p = config.pipeline
        decode, worker = _stages(p.stand_in)
        self.placement = placement or plan_placement(p)
        self.pool = EncoderPool(config.encoder, p, self.placement, worker)
        progress.encoder_actors = self.pool.actor_names
        self.geometry = InputGeometry.of(spec)
        self.per_chunk = chunk_batches(p, p.batch_size, spec.image_size)
        self.sizer = CallSizer(p.batch_size * self.per_chunk, adaptive=p.batches_per_call is None)
        chunk_bytes = p.batch_size * self.per_chunk * 3 * spec.image_size ** 2
        self.chunks_ahead = max(p.bytes_ahead // chunk_bytes, 1)
        # Bounded generator buffer: a decode task pauses instead of filling the object store.
        cpus = self.placement.decode_cpus
        self.decode = ray.remote(num_cpus=cpus, max_retries=0, _generator_backpressure_num_objects=2)(decode)
        self.write = ray.remote(num_cpus=cpus, max_retries=0)(write_shard)
        self.spec_dict = spec.to_dict()
        self.queue: deque[_ShardRun] = deque(_ShardRun(info) for info in todo)
        self.active: list[_ShardRun] = []
        self.waiting: deque[_Chunk] = deque()
        self.calls: dict[ray.ObjectRef, tuple] = {}  # stats ref → (chunks, slot, actor, encoded ref)
        self.writes: dict[ray.ObjectRef, tuple[_ShardRun, int]] = {}
        self.written: list[PartEntry] = []
        self.failed: list[ShardFailure] = []
        self._stall_checked = 0.0
        self.holding = False  # no shard starts while True: decode was stopped to let a lost encoder be placed

    def run(self) -> tuple[list[PartEntry], list[ShardFailure]]:
        """Process every queued shard; returns (parts written, shards that failed every attempt)."""
        try:
            while self.queue or self.active or self.writes:
                self._unstall()
                self._start_shards()
                self._dispatch()
                self._wait()
                self._report()
        finally:
            self.pool.shutdown()
        return self.written, self.failed

    def _start_shards(self) -> None:
        if self.holding and not self.pool.ready:
            return
        self.holding = False
        while self.queue and len(self.active) < self.placement.shards_in_flight:
            run = self.queue.popleft()
            run.gen = self.decode.remote(run.info.source, self.config, self.geometry, self.per_chunk)
            self.active.append(run)

    def _dispatch(self) -> None:
        """Send waiting chunks, oldest first, to the actors that have room: up to `sizer.chunks_per_call` a call."""
        while self.waiting and self.pool.free > 0:
            chunks = self._take(self.sizer.chunks_per_call)
            if not chunks:
                continue
            slot, actor, stats, encoded = self.pool.submit([c.ref for c in chunks])
            self.calls[stats] = (chunks, slot, actor, encoded)
            self.progress.encoder_calls += 1

    def _take(self, most: int) -> list[_Chunk]:
        """Up to `most` current chunks from the front of the queue; a chunk marked alone only by itself."""
        taken: list[_Chunk] = []
        while self.waiting and len(taken) < most:
            chunk = self.waiting[0]
            if taken and chunk.alone:
                break
            self.waiting.popleft()
            if chunk.current:  # else a chunk of an abandoned attempt
                taken.append(chunk)
                if chunk.alone:
                    break
        return taken

    def _wait(self) -> None:
        """Block until something is ready, then handle everything that is."""
        gens = {r.gen: r for r in self.active if r.gen is not None}
        loading = self.pool.loading
        pending = [*self.calls, *self.writes, *loading]
        if self._room() > 0:  # else a ready generator would wake us with nothing to do
            pending += gens
        if not pending:
            if self.active and not self.waiting:  # their chunks are nowhere: fail loudly instead of spinning
                raise RuntimeError("build driver lost track of the chunks of shards "
                                   f"{[r.info.source for r in self.active]} (a refbank bug: please report it)")
            return
        # fetch_local=False: readiness only. Fetching would copy every decoded chunk to the driver's node.
        ready, _ = ray.wait(pending, num_returns=1, timeout=0.5, fetch_local=False)
        if ready and len(pending) > 1:
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
        self._on_encoded([ref for ref in ready if ref in self.calls])
        for ref in ready:
            if ref in self.writes:
                self._on_written(ref)
            elif ref in loading:
                self.pool.on_loaded(ref)
                if self.pool.ready and not self.progress.startup_s:
                    self.progress.startup_s = self.progress.elapsed_s
            elif ref in gens:
                self._pull(gens[ref])
        self.pool.check_start_deadline()

    def _room(self) -> int:
        """How many more decoded chunks the driver takes: what the actors accept now, plus `chunks_ahead`
        read ahead (so decode runs on while the models load, or while every actor is busy)."""
        return self.pool.free + self.chunks_ahead - len(self.waiting)

    def _pull(self, run: _ShardRun) -> None:
        """Take a ready generator's next output (the previous one is a chunk: only the last is the tail)."""
        if run.gen is None or self._room() <= 0:
            return  # abandoned meanwhile, or no room: backpressure keeps the rest in the decode task
        try:
            ref = next(run.gen)
        except StopIteration:
            run.gen, run.tail, run.held = None, run.held, None
            self._maybe_write(run)
            return
        if run.held is not None:
            self.waiting.append(_Chunk(run, run.attempt, run.chunks, run.held))
            run.chunks += 1
        run.held = ref

    def _on_encoded(self, stats_refs: list[ray.ObjectRef]) -> None:
        """Record finished encoder calls; one ray.get for all of them unless one failed."""
        if not stats_refs:
            return
        try:
            results = list(zip(stats_refs, ray.get(stats_refs), [None] * len(stats_refs)))
        except Exception:  # at least one failed: take them one by one
            results = []
            for ref in stats_refs:
                try:
                    results.append((ref, ray.get(ref), None))
                except Exception as exc:
                    results.append((ref, None, exc))
        for ref, stats, error in results:
            self._on_call(ref, stats, error)

    def _on_call(self, stats_ref: ray.ObjectRef, stats: dict[str, Any] | None, error: Exception | None) -> None:
        chunks, slot, actor, encoded = self.calls.pop(stats_ref)
        self.pool.done(slot, actor)
        if isinstance(error, RayActorError):  # the actor died: replace it and send the same chunks again
            self.pool.replace_if_dead(slot, actor, error)
            self.progress.actor_restarts, self.progress.encoder_actors = self.pool.restarts, self.pool.actor_names
            self.waiting.extendleft(reversed([c for c in chunks if c.current]))
            return
        if error is not None and len(chunks) > 1:  # whose fault? each chunk goes again alone to find out
            log.info("an encoder call of %d chunks failed (%s); sending each again alone", len(chunks), error)
            self.waiting.extendleft(reversed([_Chunk(c.run, c.attempt, c.index, c.ref, alone=True)
                                              for c in chunks if c.current]))
            return
        if error is not None:  # the decode task failed (its error travels in the chunk), encode raised, data lost
            self._retry_or_fail(chunks[0].run, chunks[0].attempt, error)
            return
        self.sizer.observe(sum(s["images"] for s in stats["chunks"]), stats["seconds"])
        for place, (chunk, chunk_stats) in enumerate(zip(chunks, stats["chunks"])):
            if chunk.current:
                chunk.run.encoded[chunk.index] = (encoded, place)
                self.progress.batch_encoded(chunk.run.info.source, chunk_stats)
                self._maybe_write(chunk.run)

    def _maybe_write(self, run: _ShardRun) -> None:
        """Once a shard is decoded and all its chunks encoded, hand it to a writer task."""
        if run.gen is None and run.tail is not None and len(run.encoded) == run.chunks and run in self.active:
            refs = [run.encoded[i] for i in range(run.chunks)]
            ref = self.write.remote(self.config.bank_ref, run.info, self.spec_dict, run.tail, refs)
            self.writes[ref] = (run, run.attempt)
            self.active.remove(run)

    def _on_written(self, ref: ray.ObjectRef) -> None:
        run, attempt = self.writes.pop(ref)
        try:
            info = ray.get(ref)
        except Exception as exc:  # a bad shard (its decode error surfaces here) or a failed write
            self._retry_or_fail(run, attempt, exc)
            return
        self.written.append(info)
        self.progress.shard_written(run.info.source, info.rejects)

    def _abandon(self, run: _ShardRun) -> None:
        """Stop the shard's current attempt: its decode task is cancelled, its outputs are ignored from now on."""
        if run in self.active:
            self.active.remove(run)
        if run.gen is not None:
            ray.cancel(run.gen)
        run.reset()

    def _retry_or_fail(self, run: _ShardRun, attempt: int, exc: Exception) -> None:
        """Abandon the shard's current attempt; queue it again, or record it as failed after max_attempts."""
        if attempt != run.attempt:
            return
        self._abandon(run)
        run.failures += 1
        cause = getattr(exc, "cause", None) or exc
        if run.failures >= self.config.pipeline.max_attempts:
            log.error("shard %s failed %d times: %s", run.info.source, run.failures, cause)
            self.failed.append(ShardFailure(run.info.source, f"{type(cause).__name__}: {cause}"))
            self.progress.shard_restarted(run.info.source, failed=True)
        else:
            log.warning("shard %s attempt %d failed (%s); retrying", run.info.source, run.failures, cause)
            self.progress.shard_restarted(run.info.source, failed=False)
            self.queue.appendleft(run)

    def _unstall(self) -> None:
        """With no encoder ready while Ray places lost bundles again (node loss), stop the decode tasks in flight
        and start none: paused by backpressure, they would hold the CPUs the replacement needs forever. Their
        shards start again once an encoder is ready; that is not counted as a failed attempt."""
        if self.pool.ready or time.monotonic() - self._stall_checked < STALL_CHECK_S:
            return
        self._stall_checked = time.monotonic()
        if not self.pool.stalled():
            return
        decoding = [r for r in self.active if r.gen is not None]
        if decoding:
            log.warning("no encoder actor is ready and Ray cannot place one yet; stopping %d decode tasks to free "
                        "their CPUs", len(decoding))
        for run in decoding:
            self._abandon(run)
            self.progress.shard_reset(run.info.source)
            self.queue.appendleft(run)
        self.holding = True

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)
