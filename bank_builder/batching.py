"""How big the build's units of work are.

- Images per forward pass: the batch can change an embedding's last bits, so it is never taken from a timing: an
  explicit value, else the one the bank's last version recorded (a resume or an extension keeps it), else a
  deterministic default from the encoder spec and the device (`default_batch_size`).
- Batches per decoded chunk: from the chunk's decoded bytes (memory), not from time.
- Chunks per encoder call: these change no byte (each batch is one forward pass whatever the call), so they adapt
  at run time to the measured forward time (`CallSizer`): a fast encoder gets larger calls, so Ray's cost per
  call stays a small share of the work.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from bank_builder.config import PipelineConfig

CPU_BATCH_SIZE = 16  # the default before batch sizes were sized; CPU banks built with defaults keep their bytes
# GPU batches: about this many feature cells × channels per batch, as ViT-B/16 at 224 px (14 × 14 cells, 512-d)
# has at batch 64; a power of two in [GPU_BATCH_MIN, GPU_BATCH_MAX]. Not yet measured on a GPU.
GPU_BATCH_BUDGET = 64 * 14 * 14 * 512
GPU_BATCH_MIN, GPU_BATCH_MAX = 16, 256
CHUNK_BATCHES_MAX = 16  # batches per decoded chunk at most (tiny images would otherwise make one chunk a shard)
TARGET_CALL_S = 0.25  # compute an adaptive encoder call aims at: Ray's ~1-3 ms per call is then ≤ ~1 %
# Queued calls hold their chunks' decoded bytes: at most actors × max_calls_per_encoder × this × chunk_bytes.
CHUNKS_PER_CALL_MAX = 4
_SMOOTHING = 0.3  # weight of the newest call in the running seconds-per-image


class ModelShape(Protocol):
    """What batch sizing needs to know of an encoder (an EncoderSpec is one)."""

    @property
    def grid(self) -> int:
        """Side g of the dense feature grid."""

    @property
    def visual_dim(self) -> int:
        """Channels C of the dense features."""


def default_batch_size(spec: ModelShape, device: str) -> int:
    """Images per forward pass for `spec` on `device` ("cpu" or "cuda"): CPU_BATCH_SIZE on a CPU; on a GPU the
    largest power of two whose g² × C × batch stays within GPU_BATCH_BUDGET, clamped to [16, 256]."""
    if device != "cuda":
        return CPU_BATCH_SIZE
    per_image = max(spec.grid ** 2 * spec.visual_dim, 1)
    fits = max(GPU_BATCH_BUDGET // per_image, 1)
    return min(max(2 ** int(math.log2(fits)), GPU_BATCH_MIN), GPU_BATCH_MAX)


def resolve_batch_size(pipeline: PipelineConfig, spec: ModelShape, device: str,
                       recorded: dict[str, Any] | None) -> int:
    """The build's batch size: PipelineConfig.batch_size when set, else the one `recorded` (the bank's last
    version's build options) names, else `default_batch_size`."""
    if pipeline.batch_size is not None:
        return pipeline.batch_size
    earlier = ((recorded or {}).get("pipeline") or {}).get("batch_size")
    if isinstance(earlier, int) and earlier > 0:
        return earlier
    return default_batch_size(spec, device)


def chunk_batches(pipeline: PipelineConfig, batch_size: int, image_size: int) -> int:
    """Batches per decoded chunk: PipelineConfig.batches_per_call when set, else as many as fit
    PipelineConfig.chunk_bytes of decoded input (S×S×3 bytes an image), 1 to CHUNK_BATCHES_MAX."""
    if pipeline.batches_per_call is not None:
        return pipeline.batches_per_call
    fits = pipeline.chunk_bytes // max(batch_size * 3 * image_size ** 2, 1)
    return min(max(fits, 1), CHUNK_BATCHES_MAX)


class CallSizer:
    """Chunks per encoder call. One with an explicit batches_per_call (each chunk one call, as configured), and
    until a call has been measured; then as many as make a call's compute about TARGET_CALL_S, from the running
    mean seconds per image the encoder actors report."""

    def __init__(self, chunk_images: int, adaptive: bool) -> None:
        self.chunk_images, self.adaptive = max(chunk_images, 1), adaptive
        self.seconds_per_image: float | None = None

    def observe(self, images: int, seconds: float) -> None:
        """Fold in one call's compute: `seconds` for `images` images."""
        if images <= 0:
            return
        rate = max(seconds, 0.0) / images
        last = self.seconds_per_image
        self.seconds_per_image = rate if last is None else (1 - _SMOOTHING) * last + _SMOOTHING * rate

    @property
    def chunks_per_call(self) -> int:
        """How many waiting chunks the next call may carry."""
        if not self.adaptive or self.seconds_per_image is None:
            return 1
        chunk_s = self.seconds_per_image * self.chunk_images
        if chunk_s <= 0:
            return CHUNKS_PER_CALL_MAX
        return min(max(round(TARGET_CALL_S / chunk_s), 1), CHUNKS_PER_CALL_MAX)
