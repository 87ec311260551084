"""The units of work the build spreads over Ray: decode a shard, encode a batch, write a part.

They are plain functions and a plain class here; `pipeline` wraps them with ray.remote options.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import ray
import torch

from bank_builder.format import BankRef, PartEntry, parts as part_io
from bank_builder.config import BuildConfig, EncoderConfig
from bank_builder.embed import encode_batch, prepare_image
from bank_builder.encoders import EncoderSpec, load_encoder
from bank_builder.ingest import iter_samples
from bank_builder.records import Reject
from bank_builder.segments import make_segments


@dataclass
class DecodedBatch:
    """Encoder input for up to batch_size images of one shard.

    images (B, S, S, 3) uint8; soft_masks (n, g, g) float32 cell coverage; image_index (n,) int64 into images.
    stream_bytes: bytes of the shard read up to the batch's last image (progress).
    """

    images: np.ndarray
    soft_masks: np.ndarray
    image_index: np.ndarray
    rows: part_io.SegmentRows
    stream_bytes: int = 0


@dataclass
class EncodedBatch:
    """A batch's segment rows with their embeddings: visual (n, C) float16, quality (n,), text per row."""

    rows: part_io.SegmentRows
    visual: np.ndarray
    quality: np.ndarray
    text: list[np.ndarray | None]
    images: int


@dataclass
class ShardTail:
    """The last object a shard's decode yields: how many samples it read and what it rejected."""

    samples: int
    rejects: list[Reject]


class _BatchBuilder:
    """Accumulates prepared images and their segments until a batch is full."""

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []
        self.soft: list[np.ndarray] = []
        self.index: list[np.ndarray] = []
        self.rows = part_io.SegmentRows()
        self.stream_bytes = 0

    def add(self, key: str, image: np.ndarray, soft: np.ndarray, segments: list, stream_bytes: int) -> None:
        self.stream_bytes = stream_bytes
        self.index.append(np.full(len(segments), len(self.images), dtype=np.int64))
        self.images.append(image)
        self.soft.append(soft)
        self.rows.add(key, segments)

    def take(self) -> DecodedBatch:
        batch = DecodedBatch(np.stack(self.images), np.concatenate(self.soft), np.concatenate(self.index), self.rows,
                             self.stream_bytes)
        self.__init__()
        return batch


def decode_shard(shard: str, config: BuildConfig, spec: EncoderSpec) -> Iterator[DecodedBatch | ShardTail]:
    """Stream a shard: decode, validate and segment its samples; yield encoder batches, then a ShardTail."""
    builder, rejects, samples = _BatchBuilder(), [], 0
    for item in iter_samples(shard, config.ingest, config.storage_options):
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        segments = make_segments(item, config.segments)
        if isinstance(segments, Reject):
            rejects.append(segments)
            continue
        image, soft = prepare_image(item.image, [s.mask for s in segments], spec)
        builder.add(item.key, image, soft, segments, item.stream_bytes)
        samples += 1
        if len(builder.images) == config.pipeline.batch_size:
            yield builder.take()
    if builder.images:
        yield builder.take()
    yield ShardTail(samples=samples, rejects=rejects)


class EncoderWorker:
    """Holds one loaded encoder; encodes decoded batches (one actor per GPU, or CPU actors)."""

    def __init__(self, config: EncoderConfig, threads: int) -> None:
        self.config, self.threads = config, threads
        self.encoder: Any = None
        self.text_cache: dict[str, np.ndarray] = {}

    def load(self) -> dict[str, Any]:
        """Load the model; returns its spec. A method, not __init__, so a failure keeps its exception type."""
        # Match torch's intra-op threads to the CPUs Ray reserved for this actor, so the decode tasks
        # running beside it keep their cores.
        torch.set_num_threads(self.threads)
        self.encoder = load_encoder(self.config)
        return self.encoder.spec.to_dict()

    def encode(self, batch: DecodedBatch) -> tuple[dict[str, int], EncodedBatch]:
        """(stats for progress, embeddings); returned as two objects so the driver fetches only the stats."""
        out = encode_batch(
            self.encoder, batch.images, batch.soft_masks, batch.image_index, batch.rows.label, self.text_cache
        )
        encoded = EncodedBatch(batch.rows, out.visual, out.quality, out.text, images=len(batch.images))
        return {"images": len(batch.images), "segments": len(batch.rows), "stream_bytes": batch.stream_bytes}, encoded


def write_shard(
    ref: BankRef, info: PartEntry, spec: dict[str, Any], tail: ShardTail, encoded: list[ray.ObjectRef],
) -> PartEntry:
    """Concatenate a shard's encoded batches in order and commit them as one part (+ its rejects)."""
    batches: list[EncodedBatch] = ray.get(encoded)
    rows = part_io.SegmentRows()
    for b in batches:
        for name in vars(rows):
            getattr(rows, name).extend(getattr(b.rows, name))
    visual = np.concatenate([b.visual for b in batches]) if batches else np.zeros((0, spec["visual_dim"]), np.float16)
    quality = np.concatenate([b.quality for b in batches]) if batches else np.zeros(0, np.float32)
    text = [t for b in batches for t in b.text]
    table = part_io.part_table(info.name, info.ordinal, rows, visual, quality, text, spec["text_dim"])
    info.rows, info.samples, info.rejects = len(rows), tail.samples, len(tail.rejects)
    info.reject_reasons = dict(Counter(r.reason.value for r in tail.rejects))
    info.labelled = sum(label is not None for label in rows.label)
    info.unlabelled_by_kind = dict(Counter(k for k, label in zip(rows.mask_kind, rows.label) if label is None))
    part_io.write_rejects(ref, info.name, tail.rejects)
    return part_io.write_part(ref, table, info, spec)
