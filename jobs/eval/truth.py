"""Ground truth of held-out samples, read by the builder's own segments stage: a class map per image (class index
into the evaluated class list, IGNORED for unlabelled pixels), the scored class list, and the ground-truth
regions the oracle row pools."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from bank_builder.config import MaskKind, SegmentConfig
from bank_builder.datasets import LAYOUTS
from bank_builder.records import Reject, Sample, Segment
from bank_builder.segments import make_segments

IGNORED = -1  # truth maps: pixel not scored; predictions: no class predicted


class TruthError(ValueError):
    """A held-out sample that cannot be scored as asked (the message names the fix)."""


def corpus_classes(sample: Sample) -> list[str] | None:
    """The class table of a sample's json (`classes` {id: name}) as a list by id, or None without one."""
    table = sample.meta.get("classes")
    if not isinstance(table, dict) or not table:
        return None
    ids = sorted(int(k) for k in table)
    if ids != list(range(len(ids))):
        raise TruthError(f"sample {sample.key}: json `classes` ids must be 0..n-1 to be a class table; give the "
                         "class list with --classes")
    return [str(table[str(i)] if str(i) in table else table[i]) for i in ids]


def reduce_zero_label(sample: Sample, ignore_index: int) -> Sample:
    """mmseg's reduce_zero_label on a class-mask sample: 0 → ignore_index, v → v − 1, its class table shifted
    to match. Refused on corpora `refbank convert` wrote, whose ids are reduced already."""
    if sample.meta.get("source") in LAYOUTS:
        raise TruthError(f"sample {sample.key} comes from `refbank convert` ({sample.meta['source']}), which "
                         "already maps raw ids to the benchmark's class ids; drop --reduce-zero-label")
    if sample.mask_kind is not MaskKind.CLASS:
        raise TruthError(f"--reduce-zero-label applies to class masks; sample {sample.key} has "
                         f"{getattr(sample.mask_kind, 'value', 'no')} masks")
    mask = sample.mask.astype(np.int64)
    reduced = np.where((mask == 0) | (mask == ignore_index), ignore_index, mask - 1)
    classes = {str(int(k) - 1): v for k, v in sample.meta.get("classes", {}).items() if int(k) > 0}
    return replace(sample, mask=reduced.astype(sample.mask.dtype), meta={**sample.meta, "classes": classes})


def truth_segments(sample: Sample, ignore_index: int = 255) -> list[Segment]:
    """Every labelled or unlabelled segment of the sample's mask as the builder cuts it, none dropped for size;
    TruthError for a sample without a usable mask (it cannot be scored)."""
    if sample.mask_kind is None:
        raise TruthError(f"sample {sample.key} has no mask, so it cannot be scored; evaluate a labelled corpus "
                         "(--mask-kind names its format)")
    segments = make_segments(sample, SegmentConfig(min_area=1, max_segments=1 << 30, ignore_value=ignore_index))
    if isinstance(segments, Reject):
        raise TruthError(f"sample {sample.key}: {segments.reason.value}: {segments.detail}")
    return segments


def class_truth(segments: Sequence[Segment], shape: tuple[int, int], classes: Sequence[str]) -> np.ndarray:
    """(H, W) int64: index into `classes` of each pixel's segment label, IGNORED where unlabelled or labelled
    outside `classes`."""
    index = {name: i for i, name in enumerate(classes)}
    out = np.full(shape, IGNORED, np.int64)
    for segment in segments:
        if segment.label in index:
            out[segment.mask] = index[segment.label]
    return out


def foreground_truth(sample: Sample, segments: Sequence[Segment], background: frozenset[str]) -> np.ndarray:
    """(H, W) int64 foreground truth: binary masks → 1 where non-zero, else 0; labelled masks → 1 on labels outside
    `background`, 0 on labels in it, IGNORED on unlabelled pixels."""
    if sample.mask_kind is MaskKind.BINARY:
        return (sample.mask != 0).astype(np.int64)
    out = np.full(sample.mask.shape if sample.mask is not None else sample.image.shape[:2], IGNORED, np.int64)
    for segment in segments:
        if segment.label is not None:
            out[segment.mask] = int(segment.label not in background)
    return out


def class_map(sample: Sample, classes: list[str]) -> np.ndarray:
    """(H, W) int64 ground truth of a labelled sample: 1 + index into `classes`, 0 = unlabelled (ignored)."""
    return class_truth(truth_segments(sample), sample.image.shape[:2], classes) + 1
