"""A pool of encoder actors that replaces an actor when it dies and tells the caller which calls were lost."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

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
    """`size` EncoderWorker actors: one GPU each when the cluster has GPUs, else `cpus_per_encoder` CPUs."""

    def __init__(self, encoder: EncoderConfig, pipeline: PipelineConfig) -> None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.size = pipeline.num_encoders or max(gpus, 1)
        resources = {"num_gpus": 1} if gpus else {"num_cpus": pipeline.cpus_per_encoder}
        # Restarts are ours, not Ray's: a replacement actor is awaited before use, so a model that can
        # never load fails the build with its real error instead of restarting forever.
        self._remote = ray.remote(max_restarts=0, **resources)(EncoderWorker)
        self._config = encoder
        self._threads = max(int(pipeline.cpus_per_encoder), 1)
        self.capacity_per_actor = pipeline.max_batches_per_encoder
        self.restarts = 0
        self._max_restarts = pipeline.max_attempts * self.size
        self._token, self._started = uuid.uuid4().hex[:8], 0
        self.slots = [_Slot(*self._start()) for _ in range(self.size)]

    def _start(self) -> tuple[Any, str]:
        """Start one named actor and wait until its encoder is loaded: (handle, name)."""
        # Named so that operators (`ray list actors`) and tests can find the pool's actors.
        name = f"refbank-encoder-{self._token}-{self._started}"
        self._started += 1
        actor = self._remote.options(name=name).remote(self._config, self._threads)
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
        self.slots[slot] = _Slot(*self._start())

    def shutdown(self) -> None:
        """Kill every actor of the pool."""
        for s in self.slots:
            ray.kill(s.actor)
