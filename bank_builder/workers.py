"""The build's Ray tasks and what flows between them: decode a shard into chunks of encoder batches, write a
shard's encoded batches as one part. The encoder actor is `encoder_pool.EncoderWorker`.

Plain functions here; `driver` wraps them with ray.remote options. This module imports no torch, so decode and
write workers start fast and small.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import ray

from bank_builder.format import BankRef, PartEntry, parts as part_io
from bank_builder.config import BuildConfig, PairingConfig
from bank_builder.ingest import iter_samples
from bank_builder.pairing import candidate_phrases
from bank_builder.prepare import InputGeometry, prepare_image
from bank_builder.records import LabelSource, Reject
from bank_builder.segments import make_segments


@dataclass
class DecodedBatch:
    """Encoder input for up to batch_size images of one shard.

    images (B, S, S, 3) uint8; soft_masks (n, g, g) float32 cell coverage; image_index (n,) int64 into images.
    phrases: per image, the labels its phrases offer its unlabelled segments; pairing: how to pair them (None:
    no pairing in this build). stream_bytes: bytes of the shard read up to the batch's last image (progress).
    """

    images: np.ndarray
    soft_masks: np.ndarray
    image_index: np.ndarray
    rows: part_io.SegmentRows
    phrases: list[list[str]] = field(default_factory=list)
    pairing: PairingConfig | None = None
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

    def __init__(self, pairing: PairingConfig | None = None) -> None:
        self.images: list[np.ndarray] = []
        self.soft: list[np.ndarray] = []
        self.index: list[np.ndarray] = []
        self.rows = part_io.SegmentRows()
        self.phrases: list[list[str]] = []
        self.pairing = pairing
        self.stream_bytes = 0

    def add(self, key: str, image: np.ndarray, soft: np.ndarray, segments: list, phrases: list[str],
            stream_bytes: int) -> None:
        self.stream_bytes = stream_bytes
        self.index.append(np.full(len(segments), len(self.images), dtype=np.int64))
        self.images.append(image)
        self.soft.append(soft)
        self.rows.add(key, segments)
        self.phrases.append(phrases)

    def take(self) -> DecodedBatch:
        batch = DecodedBatch(np.stack(self.images), np.concatenate(self.soft), np.concatenate(self.index), self.rows,
                             self.phrases, self.pairing, self.stream_bytes)
        self.__init__(self.pairing)
        return batch


def decode_shard(shard: str, config: BuildConfig, geometry: InputGeometry,
                 per_chunk: int) -> Iterator[list[DecodedBatch] | ShardTail]:
    """Stream a shard: decode, validate and segment its samples; yield chunks of up to `per_chunk` encoder
    batches, then a ShardTail. Batches hold `batch_size` images (config.pipeline, resolved by the build) in shard
    order whatever the chunking, so a shard's bytes do not depend on it."""
    pairing = config.pairing if config.pairing.enabled else None  # the encoder pairs only with a text tower
    builder, rejects, samples, chunk = _BatchBuilder(pairing), [], 0, []
    batch_size = config.pipeline.batch_size
    for item in iter_samples(shard, config.ingest, config.storage_options):
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        segments = make_segments(item, config.segments)
        if isinstance(segments, Reject):
            rejects.append(segments)
            continue
        image, soft = prepare_image(item.image, [s.mask for s in segments], geometry)
        unlabelled = pairing is not None and any(s.label is None for s in segments)
        builder.add(item.key, image, soft, segments, candidate_phrases(item.meta, pairing) if unlabelled else [],
                    item.stream_bytes)
        samples += 1
        if len(builder.images) == batch_size:
            chunk.append(builder.take())
            if len(chunk) == per_chunk:
                yield chunk
                chunk = []
    if builder.images:
        chunk.append(builder.take())
    if chunk:
        yield chunk
    yield ShardTail(samples=samples, rejects=rejects)


def chunk_stats(chunk: list[DecodedBatch]) -> dict[str, int]:
    """What the driver counts of an encoded chunk: images, segments, how far into its shard it reached, and the
    images whose unlabelled segments had caption phrases to pair with."""
    return {"images": sum(len(b.images) for b in chunk), "segments": sum(len(b.rows) for b in chunk),
            "stream_bytes": max((b.stream_bytes for b in chunk), default=0),
            "captioned": sum(bool(p) for b in chunk for p in b.phrases)}


def call_stats(chunks: tuple[list[DecodedBatch], ...], seconds: float) -> dict[str, Any]:
    """What an encoder call returns beside its embeddings: each chunk's `chunk_stats`, and the call's compute
    seconds (what sizes the next calls: bank_builder.batching.CallSizer)."""
    return {"chunks": [chunk_stats(c) for c in chunks], "seconds": seconds}


def write_shard(
    ref: BankRef, info: PartEntry, spec: dict[str, Any], tail: ShardTail, encoded: list[tuple[ray.ObjectRef, int]],
) -> PartEntry:
    """Concatenate a shard's encoded chunks in order, each given as (an encoder call's output, the chunk's place in
    it), and commit them as one part (+ rejects). A call may carry chunks of several shards."""
    calls = list(dict.fromkeys(call for call, _ in encoded))
    outputs = dict(zip(calls, ray.get(calls)))
    batches: list[EncodedBatch] = [b for call, i in encoded for b in outputs[call][i]]
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
    info.paired = sum(source == "paired" for source in rows.label_source)
    # what the masks left without a label, paired ones included: a corpus read as the wrong mask kind must still
    # be reported when its captions' phrases then label some of its segments
    info.unlabelled_by_kind = dict(Counter(k for k, source in zip(rows.mask_kind, rows.label_source)
                                           if source != LabelSource.GROUND_TRUTH.value))
    part_io.write_rejects(ref, info.name, tail.rejects)
    return part_io.write_part(ref, table, info, spec)
