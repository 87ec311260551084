"""A pool of encoder actors that replaces an actor when it dies and tells the caller which calls were lost."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bank_builder.config import EncoderConfig, PipelineConfig
from bank_builder.workers import EncoderWorker

log = logging.getLogger("refbank.build")


class EncoderStartError(RuntimeError):
    """Encoder actors could not be started (weights missing, out of memory, ...); the cause is chained."""


@dataclass
class _Slot:
    actor: Any
    name: str
    busy: int = 0


class EncoderPool:
    """`size` EncoderWorker actors: one GPU each when the cluster has GPUs, else `cpus_per_encoder` CPUs.

    Each actor runs in its own bundle of one placement group, reserved for the whole build: when an actor dies
    its resources go back to its bundle, not to the cluster, so decode tasks waiting for CPUs cannot take them
    and leave the replacement unschedulable (a deadlock: decode tasks blocked on backpressure until an encoder
    consumes their batches). On node loss Ray places the lost bundles again on the nodes left."""

    def __init__(self, encoder: EncoderConfig, pipeline: PipelineConfig) -> None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.size = pipeline.num_encoders or max(gpus, 1)
        bundle = {"GPU": 1.0} if gpus else {"CPU": float(pipeline.cpus_per_encoder)}
        self._group = placement_group([bundle] * self.size)
        try:
            ray.get(self._group.ready(), timeout=pipeline.encoder_start_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self._group)
            raise EncoderStartError(
                f"the cluster could not place {self.size} encoder actors of {bundle} each within "
                f"{pipeline.encoder_start_timeout_s:.0f} s (it has {ray.cluster_resources()}); lower --num-encoders "
                "or add nodes") from None
        resources = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": pipeline.cpus_per_encoder}
        # Restarts are ours, not Ray's: a replacement actor is awaited before use, so a model that can
        # never load fails the build with its real error instead of restarting forever.
        self._remote = ray.remote(max_restarts=0, **resources)(EncoderWorker)
        self._config = encoder
        self._threads = max(int(pipeline.cpus_per_encoder), 1)
        self.capacity_per_actor = pipeline.max_batches_per_encoder
        self.restarts = 0
        self._max_restarts = pipeline.max_attempts * self.size
        self._token, self._started = uuid.uuid4().hex[:8], 0
        try:
            self.slots = [_Slot(*self._start(i)) for i in range(self.size)]
        except BaseException:
            remove_placement_group(self._group)
            raise

    def _start(self, bundle: int) -> tuple[Any, str]:
        """Start one named actor in placement-group bundle `bundle`, wait until its encoder is loaded: (handle, name)."""
        # Named so that operators (`ray list actors`) and tests can find the pool's actors.
        name = f"refbank-encoder-{self._token}-{self._started}"
        self._started += 1
        strategy = PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=bundle)
        actor = self._remote.options(name=name, scheduling_strategy=strategy).remote(self._config, self._threads)
        try:
            ray.get(actor.load.remote())
        except RayTaskError as exc:  # the loader's own error, e.g. EncoderWeightsError with its fix
            ray.kill(actor)
            raise EncoderStartError(f"encoder failed to load: {exc.cause}") from exc.cause
        except RayActorError as exc:  # the process died while loading (out of memory, ...)
            raise EncoderStartError(f"encoder actor died while loading its model: {exc}") from exc
        return actor, name

    @property
    def actor_names(self) -> list[str]:
        """Names of the live actors, one per slot."""
        return [s.name for s in self.slots]

    @property
    def free(self) -> int:
        """How many more calls the pool accepts before callers must wait (backpressure)."""
        return sum(self.capacity_per_actor - s.busy for s in self.slots)

    def submit(self, batch_ref: ray.ObjectRef) -> tuple[int, Any, ray.ObjectRef, ray.ObjectRef]:
        """Send a batch to the least-busy actor: (slot, actor, stats ref, encoded-batch ref)."""
        i = min(range(self.size), key=lambda k: self.slots[k].busy)
        slot = self.slots[i]
        slot.busy += 1
        stats, encoded = slot.actor.encode.options(num_returns=2).remote(batch_ref)
        return i, slot.actor, stats, encoded

    def done(self, slot: int) -> None:
        """Release the capacity held by a finished call."""
        self.slots[slot].busy = max(self.slots[slot].busy - 1, 0)

    def replace_if_dead(self, slot: int, actor: Any, error: RayActorError) -> None:
        """After a call failed with `error`, replace the slot's actor unless that already happened."""
        if self.slots[slot].actor is not actor:
            return
        self.restarts += 1
        if self.restarts > self._max_restarts:
            raise EncoderStartError(f"encoder actors died {self.restarts} times; last error: {error}") from error
        log.warning("encoder actor %d died (%s); starting a replacement", slot, type(error).__name__)
        self.slots[slot] = _Slot(*self._start(slot))

    def shutdown(self) -> None:
        """Kill every actor of the pool and give its reserved resources back."""
        for s in self.slots:
            ray.kill(s.actor)
        remove_placement_group(self._group)
