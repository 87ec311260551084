"""Stand-ins for the build's decode task and encoder actor, for bench/driver_scale.py only (never an encoder entry,
no CLI option names them; a build uses them only with PipelineConfig(stand_in="driver_stand_in")).

decode_shard reads no tar: a shard file's size in bytes is its image count, and every image is a 1×1 pixel with one
segment, so decode costs next to nothing and the chunks the driver moves are small. EncoderWorker returns features
of the encoder spec's shape (visual_dim float16, L2-normalised; no text) for each segment, after sleeping
images ÷ REFBANK_STAND_IN_IMAGES_PER_S seconds per call (unset or 0: no sleep), i.e. it is a GPU of that speed.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

import numpy as np

from bank_builder.config import BuildConfig, EncoderConfig
from bank_builder.format import parts as part_io
from bank_builder.prepare import InputGeometry
from bank_builder.workers import DecodedBatch, EncodedBatch, ShardTail, call_stats

SPEED_ENV = "REFBANK_STAND_IN_IMAGES_PER_S"


def _batch(images: int) -> DecodedBatch:
    rows = part_io.SegmentRows()
    for i in range(images):
        rows.image_key.append(f"img-{i:06d}")
        rows.segment_index.append(1)
        rows.label.append("thing")
        rows.label_source.append("ground_truth")
        rows.bbox.append((0, 0, 1, 1))
        rows.area.append(1)
        rows.rle.append({"size": [1, 1], "counts": "01"})
        rows.mask_kind.append("instance")
    return DecodedBatch(np.zeros((images, 1, 1, 3), np.uint8), np.ones((images, 1, 1), np.float32),
                        np.arange(images, dtype=np.int64), rows)


def decode_shard(shard: str, config: BuildConfig, geometry: InputGeometry,
                 per_call: int) -> Iterator[list[DecodedBatch] | ShardTail]:
    """Chunks of `per_call` batches for os.path.getsize(shard) one-pixel images, then the tail."""
    total, size = os.path.getsize(shard), config.pipeline.batch_size
    full = [_batch(size)] * per_call
    left = total
    while left >= size * per_call:
        yield full
        left -= size * per_call
    rest = [_batch(min(size, left - i)) for i in range(0, left, size)]
    if rest:
        yield rest
    yield ShardTail(samples=total, rejects=[])


class EncoderWorker:
    """Features of the right shape at a set speed; the interface of encoder_pool.EncoderWorker."""

    def __init__(self, config: EncoderConfig, threads: int) -> None:
        self.dim = config.entry["visual_dim"]
        self.speed = float(os.environ.get(SPEED_ENV) or 0)

    def load(self) -> dict[str, Any]:
        """Nothing to load."""
        return {}

    def encode(self, *chunks: list[DecodedBatch]) -> tuple[dict[str, Any], list[list[EncodedBatch]]]:
        """(stats, per chunk one EncodedBatch per batch) after images ÷ speed seconds."""
        start = time.perf_counter()
        images = sum(len(b.images) for chunk in chunks for b in chunk)
        if self.speed:
            time.sleep(images / self.speed)
        unit = np.full(self.dim, 1 / np.sqrt(self.dim), np.float16)
        out = [[EncodedBatch(b.rows, np.broadcast_to(unit, (len(b.rows), self.dim)), np.ones(len(b.rows), np.float32),
                             [None] * len(b.rows), images=len(b.images)) for b in chunk] for chunk in chunks]
        return call_stats(chunks, time.perf_counter() - start), out
