"""Records that flow between the build stages: a decoded sample, a reject, a segment."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from bank_builder.config import MaskKind


class RejectReason(str, Enum):
    """Why a sample was skipped; stored verbatim in the bank's rejects table."""

    TRUNCATED_MEMBER = "truncated_member"
    MISSING_IMAGE = "missing_image"
    UNDECODABLE_IMAGE = "undecodable_image"
    IMAGE_TOO_LARGE = "image_too_large"
    UNDECODABLE_MASK = "undecodable_mask"
    MASK_SIZE_MISMATCH = "mask_size_mismatch"
    MISSING_MASK = "missing_mask"
    UNKNOWN_MASK_KIND = "unknown_mask_kind"
    EMPTY_MASK = "empty_mask"
    BAD_JSON = "bad_json"
    BAD_ANNOTATION = "bad_annotation"
    NO_SEGMENTS = "no_segments"


# The kind a segment records when it was cut by superpixels rather than read from a mask.
SUPERPIXEL = "superpixel"


class LabelSource(str, Enum):
    """Where a segment's label came from."""

    GROUND_TRUTH = "ground_truth"
    PAIRED = "paired"
    NONE = "none"


@dataclass
class Sample:
    """One decoded image with its raw annotations, in shard order.

    image: (H, W, 3) uint8 RGB. mask_kind: how the mask is read (instance / class / binary / rle), None
    when the sample has no usable mask (it is cut into superpixels). mask: (H, W) uint8/uint16 raw pixel
    values of `mask.png`, or None. annotations: the parsed `rle.json` list (COCO / SA-1B style), or None.
    meta: the parsed `json` member, {} when absent. stream_bytes: how far into the shard's stored bytes the
    reader was when it yielded this sample (progress only).
    """

    shard: str
    key: str
    index: int
    image: np.ndarray
    mask_kind: MaskKind | None = None
    mask: np.ndarray | None = None
    annotations: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    stream_bytes: int = 0  # bytes of the shard read up to this sample (as stored): the build's progress in bytes


@dataclass
class Reject:
    """A sample that could not be used, with the reason and a human-readable detail."""

    shard: str
    key: str
    reason: RejectReason
    detail: str


@dataclass
class Segment:
    """One region of an image.

    mask: (H, W) bool at image resolution. bbox: XYXY pixels, max exclusive. area: pixels.
    rle: COCO RLE {"size": [H, W], "counts": str} of `mask`. mask_kind: what cut it: a MaskKind value
    (instance, class, binary, rle) or SUPERPIXEL.
    """

    index: int
    mask: np.ndarray
    label: str | None
    label_source: LabelSource
    bbox: tuple[int, int, int, int]
    area: int
    rle: dict[str, Any]
    mask_kind: str


class RejectError(Exception):
    """One unusable sample; raised inside a build stage and turned into a `Reject` row at its boundary."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(reason, detail)  # both in args, so it pickles (Ray) and unpickles intact
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"

    def to_reject(self, shard: str, key: str) -> Reject:
        """The `Reject` row for this error on sample `key` of `shard`."""
        return Reject(shard=shard, key=key, reason=self.reason, detail=self.detail)
