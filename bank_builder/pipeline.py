"""The build on Ray: plan what is left, run the driver (`driver.Driver`: decode tasks → encoder actors → part
writers, retries), then publish a new bank version that names every committed part."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from bank_builder.format import BankMismatchError, BankRef, ConcurrentUpdateError, Current, Manifest, PartEntry
from bank_builder.format import make_manifest, parts as part_io, publish, read_current, read_manifest, totals
from bank_builder.format import storage
from bank_builder.batching import resolve_batch_size
from bank_builder.config import BuildConfig, config_to_dict, fingerprint_fields, option_differences
from bank_builder.driver import Driver, ShardFailure
from bank_builder.encoder_pool import plan_placement
from bank_builder.encoders import EncoderSpec, resolve_spec
from bank_builder.ingest import shard_sizes
from bank_builder.progress import BuildProgress, ProgressCallback
from bank_builder.ray_runtime import init_ray

log = logging.getLogger("refbank.build")


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
    unlabelled: int  # segments their masks left without a label (pairing may have labelled some: `paired`)
    unlabelled_by_kind: dict[str, int]  # those by what cut them: superpixel, instance, class, ...
    part_labels: dict[str, dict[str, int]]  # part name → {"labelled": n, "unlabelled": m}
    samples: int
    rejects: int
    reject_reasons: dict[str, int]
    failed: list[ShardFailure]
    seconds: float
    startup_s: float  # part of `seconds` until the first encoder actor had loaded its model (decode runs meanwhile)
    images_per_s: float
    segments_per_s: float
    actor_restarts: int
    shard_retries: int
    encoder: dict[str, Any]
    storage: dict[str, int]  # this process's storage calls: tries, retries by cause, failed (format.retries)
    paired: int = 0  # of the labelled, labelled by pairing with caption phrases (bank_builder.pairing)
    batch_size: int = 0  # images per forward pass this build used (bank_builder.batching); 0 when nothing ran
    encoder_calls: int = 0  # encoder actor calls this run sent
    pairing_skipped: str | None = None  # why pairing did not run although enabled (the encoder has no text tower)

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
    written, failed = [], []
    if plan.todo:
        placement = plan_placement(config.pipeline)
        config = _with_batch_size(config, spec, plan, placement.actor_resources.get("num_gpus", 0) > 0)
        written, failed = Driver(config, spec, plan.todo, progress, on_progress, placement).run()
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
        storage=(storage.counters() - calls).to_dict(), paired=sum(p.paired for p in parts),
        batch_size=config.pipeline.batch_size or 0, encoder_calls=progress.encoder_calls,
        pairing_skipped=_pairing_skipped(config, spec, progress),
    )


def _pairing_skipped(config: BuildConfig, spec: EncoderSpec, progress: BuildProgress) -> str | None:
    """Why pairing did not run in this build although enabled and images offered captions, else None."""
    if not (config.pairing.enabled and spec.text_dim is None and progress.captioned):
        return None
    return (f"encoder {spec.name} has no text tower to embed the captions' phrases "
            f"({progress.captioned} images built in this run had some)")


def _with_batch_size(config: BuildConfig, spec: EncoderSpec, plan: _Plan, on_gpus: bool) -> BuildConfig:
    """`config` with the batch size this build uses (`batching.resolve_batch_size`): explicit, else what the
    bank's last version recorded, else sized from the model and device. The manifest records it, so a resume
    or an extension uses the same; it is not in the fingerprint (banks built before it was sized keep theirs)."""
    device = config.encoder.device if config.encoder.device != "auto" else ("cuda" if on_gpus else "cpu")
    recorded = plan.parent.build if plan.parent is not None else None
    size = resolve_batch_size(config.pipeline, spec, device, recorded)
    log.info("batch size %d (%s)", size, "given" if config.pipeline.batch_size else
             "the bank's recorded one" if recorded else f"sized for {spec.name} on {device}")
    return replace(config, pipeline=replace(config.pipeline, batch_size=size))


def _publish(config: BuildConfig, spec: EncoderSpec, fingerprint: str, parts: list[PartEntry],
             plan: _Plan) -> str:
    """Publish a version naming `parts`, on condition that CURRENT still names the version the plan started
    from. The parent's index and tombstones carry over: the index keeps serving the parts it holds until
    `refbank index` adds the new ones, and removed segments stay removed."""
    build = {k: v for k, v in config_to_dict(config).items() if k != "storage_options"}  # may hold secrets
    body = make_manifest(parts, spec.to_dict(), fingerprint, build)
    if plan.parent is not None:
        removed = plan.parent.totals.get("removed")
        body = body.with_(index=plan.parent.index, tombstones=plan.parent.tombstones, curation=plan.parent.curation,
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
