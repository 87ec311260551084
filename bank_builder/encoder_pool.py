"""Encoder actors: how many and how big on the cluster at hand, the actor itself, and a pool that starts them
without blocking the build and replaces one when it dies."""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bank_builder.config import EncoderConfig, PipelineConfig
from bank_builder.embed import embed_labels, encode_batch
from bank_builder.encoders import load_encoder
from bank_builder.pairing import pair_batch
from bank_builder.workers import DecodedBatch, EncodedBatch, call_stats

log = logging.getLogger("refbank.build")

# On a CPU node the encoder actor leaves room for this many decode tasks beside it.
DECODE_TASKS_BESIDE_A_CPU_ENCODER = 2


class EncoderStartError(RuntimeError):
    """Encoder actors could not be started (weights missing, out of memory, ...); the cause is chained."""


@dataclass(frozen=True)
class Placement:
    """How a build spreads over the cluster it runs on (`plan_placement`)."""

    actors: int
    bundle: dict[str, float]  # one placement-group bundle per actor
    actor_resources: dict[str, float]  # the actor's ray.remote options: num_cpus, num_gpus
    threads: int  # torch intra-op threads per actor
    decode_cpus: float  # CPUs each decode (and write) task reserves
    shards_in_flight: int


def plan_placement(pipeline: PipelineConfig) -> Placement:
    """Size the build from the live nodes: one actor per GPU, or one CPU actor that takes its node's cores but
    what decode needs. Explicit PipelineConfig values win over every rule here."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpus = int(sum(r.get("GPU", 0) for r in nodes)) if pipeline.gpus is None else pipeline.gpus
    cpus = [r.get("CPU", 0.0) for r in nodes]
    actors = pipeline.num_encoders or max(gpus, 1)
    decode = pipeline.cpus_per_decode if pipeline.cpus_per_decode is not None else (1.0 if gpus else 0.25)
    if gpus:
        per_actor = pipeline.cpus_per_encoder or 0.0
        bundle = {"GPU": 1.0, **({"CPU": per_actor} if per_actor else {})}
        resources = {"num_gpus": 1, "num_cpus": per_actor}
        # Decode gets every CPU the actors leave, one task per CPU: that is what keeps fast GPUs fed.
        spare = int((sum(cpus) - actors * per_actor) // decode)
        shards = max(2 * actors + 1, spare)
    else:
        per_node = math.ceil(actors / max(sum(c > 0 for c in cpus), 1))
        room = max(cpus, default=1.0) - DECODE_TASKS_BESIDE_A_CPU_ENCODER * decode
        per_actor = pipeline.cpus_per_encoder or max(room / per_node, decode)
        bundle, resources = {"CPU": float(per_actor)}, {"num_cpus": per_actor}
        shards = 2 * actors + 1
    # Threads round up: a CPU actor reserving 1.5 of 2 cores runs 2 threads, and the small decode work runs in
    # its gaps (on 2 cores, 2 threads + decode beat 1 thread + an idle half core by far; BENCHMARKS.md).
    return Placement(actors=actors, bundle=bundle, actor_resources=resources,
                     threads=max(math.ceil(per_actor), 1), decode_cpus=decode,
                     shards_in_flight=pipeline.max_shards_in_flight or shards)


class EncoderWorker:
    """Holds one loaded encoder; encodes chunks of decoded batches (one actor per GPU, or CPU actors)."""

    def __init__(self, config: EncoderConfig, threads: int) -> None:
        self.config, self.threads = config, threads
        self.encoder: Any = None
        self.text_cache: dict[str, np.ndarray] = {}

    def load(self) -> dict[str, Any]:
        """Load the model; returns its spec. A method, not __init__, so a failure keeps its exception type."""
        # torch's intra-op threads follow the CPUs Ray reserved for this actor (Placement.threads).
        torch.set_num_threads(self.threads)
        self.encoder = load_encoder(self.config)
        return self.encoder.spec.to_dict()

    def encode(self, *chunks: list[DecodedBatch]) -> tuple[dict[str, Any], list[list[EncodedBatch]]]:
        """(stats: `workers.call_stats`, per chunk the embeddings of each of its batches); two objects, so the
        driver fetches only the stats. Each batch is one forward pass, as it would be alone, so neither the
        chunks nor the calls they travel in ever change a byte."""
        start = time.perf_counter()
        encoded = [[self._encode(batch) for batch in chunk] for chunk in chunks]
        return call_stats(chunks, time.perf_counter() - start), encoded

    def _encode(self, batch: DecodedBatch) -> EncodedBatch:
        """One forward pass: the batch's segment embeddings (pairing its unlabelled segments when it can)."""
        out = encode_batch(self.encoder, batch.images, batch.soft_masks, batch.image_index, batch.rows.label,
                           self.text_cache)
        if batch.pairing is not None and self.encoder.spec.text_dim and any(batch.phrases):
            self._pair(batch, out)
        return EncodedBatch(batch.rows, out.visual, out.quality, out.text, images=len(batch.images))

    def _pair(self, batch: DecodedBatch, out: Any) -> None:
        """Label the batch's unlabelled segments with their images' phrases (bank_builder.pairing), in place."""
        embed = lambda labels: embed_labels(self.encoder, labels, self.text_cache)  # noqa: E731
        for row in pair_batch(batch.rows, batch.image_index, out.visual, batch.phrases, embed, batch.pairing):
            out.text[row] = self.text_cache[batch.rows.label[row]]


@dataclass
class _Slot:
    actor: Any
    name: str
    loading: ray.ObjectRef | None  # the actor's load call until its model is ready
    busy: int = 0


class EncoderPool:
    """`placement.actors` encoder actors, started without waiting: the caller feeds a slot once its load call
    is done (`on_loaded`), so decode runs while the models load.

    Each actor runs in its own bundle of one placement group, reserved for the whole build: when an actor dies
    its resources go back to its bundle, not to the cluster, so decode tasks waiting for CPUs cannot take them
    and leave the replacement unschedulable (a deadlock: decode tasks blocked on backpressure until an encoder
    consumes their batches). On node loss Ray places the lost bundles again on the nodes left; when it cannot
    for want of CPUs that decode tasks hold, `stalled` tells the caller to stop them."""

    def __init__(self, encoder: EncoderConfig, pipeline: PipelineConfig, placement: Placement | None = None,
                 worker_class: type = EncoderWorker) -> None:
        placement = placement or plan_placement(pipeline)
        self.size, self._timeout = placement.actors, pipeline.encoder_start_timeout_s
        self._group = placement_group([placement.bundle] * self.size)
        try:
            ray.get(self._group.ready(), timeout=self._timeout)
        except GetTimeoutError:
            remove_placement_group(self._group)
            raise EncoderStartError(
                f"the cluster could not place {self.size} encoder actors of {placement.bundle} each within "
                f"{self._timeout:.0f} s (it has {ray.cluster_resources()}); lower --num-encoders or add nodes") from None
        # Restarts are ours, not Ray's: a replacement's load call is awaited before use, so a model that can
        # never load fails the build with its real error instead of restarting forever.
        self._remote = ray.remote(max_restarts=0, **placement.actor_resources)(worker_class)
        self._config, self._threads = encoder, placement.threads
        self.capacity_per_actor = pipeline.max_calls_per_encoder
        self.restarts = 0
        self._max_restarts = pipeline.max_attempts * self.size
        self._token, self._started = uuid.uuid4().hex[:8], 0
        self._waiting_since: float | None = time.monotonic()  # no slot ready since then
        self._closed = False
        self.slots = [self._start(i) for i in range(self.size)]

    def _start(self, bundle: int) -> _Slot:
        """Start one named actor in placement-group bundle `bundle` and its load call."""
        # Named so that operators (`ray list actors`) and tests can find the pool's actors.
        name = f"refbank-encoder-{self._token}-{self._started}"
        self._started += 1
        strategy = PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=bundle)
        actor = self._remote.options(name=name, scheduling_strategy=strategy).remote(self._config, self._threads)
        return _Slot(actor, name, actor.load.remote())

    @property
    def actor_names(self) -> list[str]:
        """Names of the actors, one per slot (loaded or still loading)."""
        return [s.name for s in self.slots]

    @property
    def loading(self) -> dict[ray.ObjectRef, int]:
        """Load calls in flight → their slot."""
        return {s.loading: i for i, s in enumerate(self.slots) if s.loading is not None}

    @property
    def ready(self) -> int:
        """How many actors have loaded their model."""
        return sum(s.loading is None for s in self.slots)

    @property
    def free(self) -> int:
        """How many more calls the loaded actors accept before callers must wait (backpressure)."""
        return sum(self.capacity_per_actor - s.busy for s in self.slots if s.loading is None)

    def on_loaded(self, load_ref: ray.ObjectRef) -> None:
        """A load call finished: its slot takes calls from now on, or (the actor died) is started again.
        EncoderStartError when the model cannot load (bad weights: no restart helps)."""
        slot = self.loading[load_ref]
        try:
            ray.get(load_ref)
        except RayTaskError as exc:  # the loader's own error, e.g. EncoderWeightsError with its fix
            self.shutdown()
            raise EncoderStartError(f"encoder failed to load: {exc.cause}") from exc.cause
        except RayActorError as exc:  # the process died while loading (out of memory, node lost, ...)
            self.replace_if_dead(slot, self.slots[slot].actor, exc)
            return
        self.slots[slot].loading = None
        self._waiting_since = None

    def check_start_deadline(self) -> None:
        """EncoderStartError when no actor has been ready for encoder_start_timeout_s (e.g. none can be placed)."""
        if self.ready:
            self._waiting_since = None
        elif self._waiting_since is None:
            self._waiting_since = time.monotonic()
        elif time.monotonic() - self._waiting_since > self._timeout:
            raise EncoderStartError(f"no encoder actor was ready for {self._timeout:.0f} s (cluster: "
                                    f"{ray.cluster_resources()}); add nodes or lower --num-encoders")

    def stalled(self) -> bool:
        """True when no actor is ready and Ray is still placing lost bundles again (a node died): tasks holding
        CPUs, such as decode tasks paused by backpressure, may be what keeps them from being placed."""
        return not self.ready and placement_group_table(self._group).get("state") == "RESCHEDULING"

    def submit(self, chunk_refs: list[ray.ObjectRef]) -> tuple[int, Any, ray.ObjectRef, ray.ObjectRef]:
        """Send chunks, one call, to the least-busy loaded actor: (slot, actor, stats ref, encoded-chunks ref)."""
        i = min((k for k, s in enumerate(self.slots) if s.loading is None), key=lambda k: self.slots[k].busy)
        slot = self.slots[i]
        slot.busy += 1
        stats, encoded = slot.actor.encode.options(num_returns=2).remote(*chunk_refs)
        return i, slot.actor, stats, encoded

    def done(self, slot: int, actor: Any) -> None:
        """Release the capacity a finished call of `actor` held (nothing when the slot has a new actor since)."""
        if self.slots[slot].actor is actor:
            self.slots[slot].busy = max(self.slots[slot].busy - 1, 0)

    def replace_if_dead(self, slot: int, actor: Any, error: RayActorError) -> None:
        """After a call of `actor` failed with `error`, start a replacement in its slot unless that happened
        already; the replacement takes calls once `on_loaded` has seen its load call finish."""
        if self.slots[slot].actor is not actor:
            return
        self.restarts += 1
        if self.restarts > self._max_restarts:
            self.shutdown()
            raise EncoderStartError(f"encoder actors died {self.restarts} times; last error: {error}") from error
        log.warning("encoder actor %d died (%s); starting a replacement", slot, type(error).__name__)
        ray.kill(actor)  # a call can fail for a dying actor before the process is gone
        self.slots[slot] = self._start(slot)

    def shutdown(self) -> None:
        """Kill every actor of the pool and give its reserved resources back (once)."""
        if self._closed:
            return
        self._closed = True
        for s in self.slots:
            ray.kill(s.actor)
        remove_placement_group(self._group)
