"""Helpers shared by the build tests: a small build config and a whole-bank reader."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bank_builder.format import BankRef, parts, read_manifest
from bank_builder.config import BuildConfig, EncoderConfig, IngestConfig, MaskKind, PipelineConfig, SegmentConfig


def tiny_config(source: str, bank: str, storage_options: dict[str, Any] | None = None,
                mask_kind: MaskKind = MaskKind.AUTO, **pipeline: Any) -> BuildConfig:
    """A fast build: the tiny open_clip architecture with seeded untrained weights, small batches."""
    return BuildConfig(
        source=source,
        bank=bank,
        ingest=IngestConfig(mask_kind=mask_kind),
        segments=SegmentConfig(min_area=32),
        encoder=EncoderConfig(name="tiny-clip", weights="untrained", seed=0),
        pipeline=PipelineConfig(**{"batch_size": 4, "progress_interval_s": 0.0, **pipeline}),
        storage_options=storage_options or {},
    )


def read_bank(bank: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Every row of every part the CURRENT manifest names, in manifest order."""
    ref = BankRef(bank, storage_options or {})
    return pa.concat_tables([parts.read_part(ref, p.name) for p in read_manifest(ref).parts])


def part_digests(bank: str) -> list[tuple[str, int, str]]:
    """(part name, rows, sha256 of the file's bytes) of every part the bank's current version names."""
    ref = BankRef(bank)
    return [(p.name, p.rows, hashlib.sha256(Path(parts.part_url(ref, p.name)).read_bytes()).hexdigest())
            for p in read_manifest(ref).parts]


def assert_same_bank(a: pa.Table, b: pa.Table) -> None:
    """Same rows, same ids, same metadata and bit-identical embeddings."""
    assert a.num_rows == b.num_rows
    for column in ["segment_id", "part", "image_key", "segment_index", "label", "label_source", "bbox", "area", "mask"]:
        assert a[column].to_pylist() == b[column].to_pylist(), column
    for column in ["visual_embedding", "text_embedding", "quality"]:
        np.testing.assert_array_equal(_numpy(a[column]), _numpy(b[column]), err_msg=column)


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    values = column.combine_chunks()
    if pa.types.is_fixed_size_list(values.type):
        return values.values.to_numpy(zero_copy_only=False).reshape(len(values), -1)  # null rows keep their slots
    return values.to_numpy(zero_copy_only=False)
