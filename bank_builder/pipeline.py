"""The build on Ray: plan what is left, stream shards through decode tasks → encoder actors → part writers,
retry what fails, then publish a new bank version that names every committed part."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from bank_builder.format import BankMismatchError, BankRef, ConcurrentUpdateError, Current, Manifest, PartEntry
from bank_builder.format import make_manifest, parts as part_io, publish, read_current, read_manifest, totals
from bank_builder.format import storage
from bank_builder.config import BuildConfig, config_to_dict, fingerprint_fields, option_differences
from bank_builder.encoder_pool import EncoderPool
from bank_builder.encoders import EncoderSpec, resolve_spec
from bank_builder.ingest import shard_sizes
from bank_builder.progress import BuildProgress, ProgressCallback
from bank_builder.ray_runtime import init_ray
from bank_builder.workers import decode_shard, write_shard

log = logging.getLogger("refbank.build")


@dataclass
class ShardFailure:
    """A shard that failed every attempt, with the last error."""

    shard: str
    error: str


@dataclass
class BuildReport:
    """What a build did. `version`: the bank's version that holds every shard — the one this build published
    (`published`), or the one it found up to date; None when shards failed (nothing published)."""

    bank: str
    version: str | None
    published: bool
    up_to_date: bool
    shards: int
    parts_written: int
    parts_skipped: int
    segments: int
    labelled: int  # segments with a label, in every part of the version
    unlabelled: int
    unlabelled_by_kind: dict[str, int]  # the unlabelled ones by what cut them: superpixel, instance, class, ...
    part_labels: dict[str, dict[str, int]]  # part name → {"labelled": n, "unlabelled": m}
    samples: int
    rejects: int
    reject_reasons: dict[str, int]
    failed: list[ShardFailure]
    seconds: float
    startup_s: float  # part of `seconds` spent starting encoder actors (model load)
    images_per_s: float
    segments_per_s: float
    actor_restarts: int
    shard_retries: int
    encoder: dict[str, Any]
    storage: dict[str, int]  # this process's storage calls: tries, retries by cause, failed (format.retries)

    @property
    def ok(self) -> bool:
        """True when every shard is in the bank."""
        return not self.failed


def build_fingerprint(config: BuildConfig, spec: EncoderSpec) -> str:
    """Hash of everything that changes a part's content; parts with another fingerprint are rebuilt."""
    blob = json.dumps({**fingerprint_fields(config), "spec": spec.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class _Plan:
    done: list[PartEntry]
    todo: list[PartEntry]  # rows/bytes/sha256 filled in by the writer
    parent: Manifest | None
    current: Current  # what CURRENT named when planned: the publish is conditional on it


def plan_build(config: BuildConfig, spec: EncoderSpec, fingerprint: str, shards: list[str]) -> _Plan:
    """Split shards into committed parts (reused) and the rest, with stable ordinals."""
    ref = config.bank_ref
    current = read_current(ref)
    parent = read_manifest(ref, current.version) if current.version else None
    if parent is not None and parent.fingerprint != fingerprint:
        differ = option_differences(parent.build, config) or _spec_differences(parent.encoder, spec.to_dict())
        raise BankMismatchError(
            f"bank {ref} version {parent.version} was built with other options: {'; '.join(differ)}. Build with "
            "the bank's options, or into a new bank URI."
        )
    known = {p.source: p for p in (parent.parts if parent else [])}
    next_ordinal = max((p.ordinal for p in known.values()), default=-1) + 1
    ordinals = {}
    for shard in shards:  # sorted: a fresh (or resumed) build numbers its shards the same way every time
        if shard in known:
            ordinals[shard] = known[shard].ordinal
        else:
            ordinals[shard], next_ordinal = next_ordinal, next_ordinal + 1
    fresh = [(s, part_io.part_name(s, ordinals[s], fingerprint)) for s in shards if s not in known]
    with ThreadPoolExecutor(16) as pool:  # one small read per shard: overlap the round trips
        commits = list(pool.map(lambda sn: part_io.read_commit(ref, sn[1]), fresh))
    done, todo = list(known.values()), []
    for (shard, name), commit in zip(fresh, commits):
        if commit and commit.fingerprint == fingerprint and commit.ordinal == ordinals[shard] and commit.source == shard:
            done.append(commit)
        else:
            todo.append(PartEntry(name, ordinals[shard], shard, 0, 0, "", 0, 0, {}, fingerprint))
    return _Plan(done=done, todo=todo, parent=parent, current=current)


def _spec_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'encoder <field>: bank X, this build Y' per encoder-spec field that differs (the entry only by name)."""
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        have, want = recorded.get(key), wanted.get(key)
        if have != want:
            out.append(f"encoder {key}: the registry entry differs" if key == "entry" else
                       f"encoder {key}: bank {have!r}, this build {want!r}")
    return out or ["the build fingerprint differs (a bank written by another refbank version?)"]


@dataclass
class _ShardRun:
    """Driver-side state of one shard attempt."""

    info: PartEntry
    attempt: int = 0
    gen: Any = None
    held: ray.ObjectRef | None = None  # the newest generator output; it is the ShardTail if the generator ends next
    tail: ray.ObjectRef | None = None
    batches: int = 0
    encoded: dict[int, ray.ObjectRef] = field(default_factory=dict)


class _Driver:
    """The event loop: bounded shards in flight, bounded batches queued per actor, retries per shard."""

    def __init__(self, config: BuildConfig, spec: EncoderSpec, todo: list[PartEntry],
                 progress: BuildProgress, on_progress: ProgressCallback | None) -> None:
        self.config, self.spec, self.progress, self.on_progress = config, spec, progress, on_progress
        p = config.pipeline
        self.pool = EncoderPool(config.encoder, p)
        progress.encoder_actors, progress.startup_s = self.pool.actor_names, progress.elapsed_s
        self.max_shards = p.max_shards_in_flight or 2 * self.pool.size + 1
        # Bounded generator buffer: a decode task pauses instead of filling the object store.
        self.decode = ray.remote(num_cpus=1, max_retries=0, _generator_backpressure_num_objects=2)(decode_shard)
        self.write = ray.remote(num_cpus=1, max_retries=0)(write_shard)
        self.queue: deque[_ShardRun] = deque(_ShardRun(info) for info in todo)
        self.active: list[_ShardRun] = []
        self.waiting: deque[tuple[_ShardRun, int, int, ray.ObjectRef]] = deque()  # (run, attempt, batch, ref)
        self.calls: dict[ray.ObjectRef, tuple] = {}  # stats ref → (run, attempt, batch, decoded ref, slot, actor, encoded ref)
        self.writes: dict[ray.ObjectRef, tuple[_ShardRun, int]] = {}
        self.written: list[PartEntry] = []
        self.failed: list[ShardFailure] = []

    def run(self) -> tuple[list[PartEntry], list[ShardFailure]]:
        """Process every queued shard; returns (parts written, shards that failed every attempt)."""
        try:
            while self.queue or self.active or self.writes:
                self._start_shards()
                self._pull_batches()
                self._dispatch()
                self._wait()
        finally:
            self.pool.shutdown()
        return self.written, self.failed

    def _start_shards(self) -> None:
        while self.queue and len(self.active) < self.max_shards:
            run = self.queue.popleft()
            run.gen = self.decode.remote(run.info.source, self.config, self.spec)
            self.active.append(run)

    def _pull_batches(self) -> None:
        """Take ready outputs from decode generators while the encoders have room (backpressure)."""
        for run in [r for r in self.active if r.gen is not None]:
            while len(self.waiting) < self.pool.free and ray.wait([run.gen], timeout=0)[0]:
                try:
                    ref = next(run.gen)
                except StopIteration:
                    run.gen, run.tail, run.held = None, run.held, None
                    self._maybe_write(run)
                    break
                if run.held is not None:
                    self.waiting.append((run, run.attempt, run.batches, run.held))
                    run.batches += 1
                run.held = ref

    def _dispatch(self) -> None:
        while self.waiting and self.pool.free > 0:
            run, attempt, batch, ref = self.waiting.popleft()
            if attempt != run.attempt:
                continue  # a batch of an abandoned attempt
            slot, actor, stats, encoded = self.pool.submit(ref)
            self.calls[stats] = (run, attempt, batch, ref, slot, actor, encoded)

    def _wait(self) -> None:
        pending = list(self.calls) + list(self.writes)
        if len(self.waiting) < self.pool.free:  # else a ready generator would wake us with nothing to do
            pending += [r.gen for r in self.active if r.gen is not None]
        if not pending:
            return
        ready, _ = ray.wait(pending, num_returns=1, timeout=0.5)
        for ref in ready:
            if ref in self.calls:
                self._on_encoded(ref)
            elif ref in self.writes:
                self._on_written(ref)

    def _on_encoded(self, stats_ref: ray.ObjectRef) -> None:
        run, attempt, batch, decoded, slot, actor, encoded = self.calls.pop(stats_ref)
        self.pool.done(slot)
        try:
            stats = ray.get(stats_ref)
        except RayActorError as exc:  # the actor died: replace it and send the same batch again
            self.pool.replace_if_dead(slot, actor, exc)
            self.progress.actor_restarts, self.progress.encoder_actors = self.pool.restarts, self.pool.actor_names
            if attempt == run.attempt:
                self.waiting.appendleft((run, attempt, batch, decoded))
            return
        except Exception as exc:  # the decode task failed (its error travels in the batch) or encode raised
            self._retry_or_fail(run, attempt, exc)
            return
        if attempt != run.attempt:
            return
        run.encoded[batch] = encoded
        self.progress.batch_encoded(run.info.source, stats)
        self._report()
        self._maybe_write(run)

    def _maybe_write(self, run: _ShardRun) -> None:
        """Once a shard is decoded and all its batches encoded, hand it to a writer task."""
        if run.gen is None and run.tail is not None and len(run.encoded) == run.batches and run in self.active:
            refs = [run.encoded[i] for i in range(run.batches)]
            ref = self.write.remote(self.config.bank_ref, run.info, self.spec.to_dict(), run.tail, refs)
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
        self._report()

    def _retry_or_fail(self, run: _ShardRun, attempt: int, exc: Exception) -> None:
        """Abandon the shard's current attempt; queue it again, or record it as failed after max_attempts."""
        if attempt != run.attempt:
            return
        if run in self.active:
            self.active.remove(run)
        if run.gen is not None:
            ray.cancel(run.gen)  # stop decoding an abandoned attempt; its outputs are ignored
        run.attempt += 1
        cause = getattr(exc, "cause", None) or exc
        if run.attempt >= self.config.pipeline.max_attempts:
            log.error("shard %s failed %d times: %s", run.info.source, run.attempt, cause)
            self.failed.append(ShardFailure(run.info.source, f"{type(cause).__name__}: {cause}"))
            self.progress.shard_restarted(run.info.source, failed=True)
        else:
            log.warning("shard %s attempt %d failed (%s); retrying", run.info.source, run.attempt, cause)
            self.progress.shard_restarted(run.info.source, failed=False)
            run.gen, run.held, run.tail, run.batches, run.encoded = None, None, None, 0, {}
            self.queue.appendleft(run)
        self._report()

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)


MAX_REPLANS = 5  # publishes lost to concurrent writers before a build gives up


def build_bank(config: BuildConfig, on_progress: ProgressCallback | None = None) -> BuildReport:
    """Build (or finish, or extend) the bank at config.bank from the shards at config.source.

    Publishing is a compare-and-swap on CURRENT. When another writer publishes while this build runs, the build
    plans again on top of the new version: its new shards get the next free ordinals (their parts are
    renumbered copies, nothing is encoded again) and it publishes after that writer's version, so no shard is
    lost and no segment id means two segments. A bank whose new version has other options is refused."""
    spec, calls = resolve_spec(config.encoder), storage.counters()
    fingerprint = build_fingerprint(config, spec)
    sizes = shard_sizes(config.source, config.storage_options)
    shards = sorted(sizes)
    plan = plan_build(config, spec, fingerprint, shards)
    init_ray()  # after the cheap checks above, so a bad option fails in milliseconds, not after Ray starts
    progress = BuildProgress(shards_total=len(shards), shards_skipped=len(plan.done),
                             shard_bytes={p.source: sizes[p.source] for p in plan.todo})
    log.info("%d shards: %d already committed, %d to build", len(shards), len(plan.done), len(plan.todo))
    written, failed = _Driver(config, spec, plan.todo, progress, on_progress).run() if plan.todo else ([], [])
    pending = {p.source: p for p in _unpublished(plan) + written}  # parts the parent lacks, by shard
    version = None
    for attempt in range(MAX_REPLANS + 1):
        parts = _published(plan) + list(pending.values())
        up_to_date = not failed and plan.parent is not None and not pending
        if failed or up_to_date:
            break
        try:
            version = _publish(config, spec, fingerprint, parts, plan)
            break
        except ConcurrentUpdateError as exc:
            if attempt == MAX_REPLANS:
                raise
            log.warning("%s; planning again on top of it", str(exc).split(";")[0])
            plan = plan_build(config, spec, fingerprint, shards)
            pending = _renumber(config, spec, plan, pending)
    published = version is not None
    if up_to_date:
        version = plan.parent.version
    counts = totals(parts)
    unlabelled: Counter[str] = Counter()
    for p in parts:
        unlabelled.update(p.unlabelled_by_kind)
    return BuildReport(
        bank=config.bank, version=version, published=published, up_to_date=up_to_date, shards=len(shards),
        parts_written=len(written), parts_skipped=len(plan.done), segments=counts["segments"],
        labelled=sum(p.labelled for p in parts), unlabelled=sum(unlabelled.values()),
        unlabelled_by_kind=dict(sorted(unlabelled.items())),
        part_labels={p.name: {"labelled": p.labelled, "unlabelled": p.rows - p.labelled} for p in parts},
        samples=counts["samples"], rejects=counts["rejects"], reject_reasons=counts["reject_reasons"],
        failed=failed, seconds=progress.elapsed_s, startup_s=progress.startup_s, images_per_s=progress.images_per_s,
        segments_per_s=progress.segments_per_s, actor_restarts=progress.actor_restarts,
        shard_retries=progress.shard_retries, encoder=spec.to_dict(),
        storage=(storage.counters() - calls).to_dict(),
    )


def _publish(config: BuildConfig, spec: EncoderSpec, fingerprint: str, parts: list[PartEntry],
             plan: _Plan) -> str:
    """Publish a version naming `parts`, on condition that CURRENT still names the version the plan started
    from. The parent's index and tombstones carry over: the index keeps serving the parts it holds until
    `refbank index` adds the new ones, and removed segments stay removed."""
    build = {k: v for k, v in config_to_dict(config).items() if k != "storage_options"}  # may hold secrets
    body = make_manifest(parts, spec.to_dict(), fingerprint, build)
    if plan.parent is not None:
        removed = plan.parent.totals.get("removed")
        body = body.with_(index=plan.parent.index, tombstones=plan.parent.tombstones,
                          totals={**body.totals, **({"removed": removed} if removed else {})})
    return publish(config.bank_ref, body, plan.current)


def _published(plan: _Plan) -> list[PartEntry]:
    """The parts of the version the plan starts from."""
    return list(plan.parent.parts) if plan.parent else []


def _unpublished(plan: _Plan) -> list[PartEntry]:
    """Committed parts the plan reuses that its parent version does not list (an earlier run's work)."""
    named = {p.name for p in _published(plan)}
    return [p for p in plan.done if p.name not in named]


def _renumber(config: BuildConfig, spec: EncoderSpec, plan: _Plan,
              pending: dict[str, PartEntry]) -> dict[str, PartEntry]:
    """The parts still to publish after another writer published `plan.parent`: each pending part at the
    ordinal the new plan gives its shard (a renumbered copy when it changed; nothing is encoded again).

    A shard the new parent already holds (the other writer built it too) is dropped: its published part is
    reused. A shard whose part at the new ordinal is committed already keeps that part."""
    target = {p.source: p for p in plan.todo} | {p.source: p for p in _unpublished(plan)}
    moved = {}
    for source, part in pending.items():
        want = target.get(source)
        if want is None:
            continue  # published by the other writer
        if want.ordinal == part.ordinal or want.sha256:  # same ordinal, or already committed at the new one
            moved[source] = part if want.ordinal == part.ordinal else want
            continue
        log.info("shard %s: ordinal %d was taken by another writer; renumbered to %d", source, part.ordinal,
                 want.ordinal)
        moved[source] = part_io.renumber_part(config.bank_ref, part, want.ordinal, spec.to_dict())
    return moved
