"""Segments stage: a sample's mask (instance / class / binary PNG, COCO RLE) → segments; no mask → superpixels.

Every mask kind first becomes candidate regions (an area each, and a way to draw one); filtering by
area and count is shared, and only the regions kept are ever drawn at full resolution. Each segment
records the kind that cut it; `unlabelled_warning` explains a build whose masks left segments unlabelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage.segmentation import felzenszwalb

from bank_builder.config import MaskKind, SegmentConfig
from bank_builder.records import SUPERPIXEL, LabelSource, Reject, RejectError, RejectReason, Sample, Segment

Bbox = tuple[int, int, int, int]  # XYXY pixels, max exclusive

# Felzenszwalb runs on a copy whose long side is at most this; its label map is upsampled (nearest).
_SUPERPIXEL_SIDE = 256


@dataclass(frozen=True)
class _Regions:
    """Candidate regions of one image, before filtering by area and count."""

    areas: np.ndarray  # (n,) int64 pixels
    labels: list[str | None]
    draw: Callable[[int], tuple[np.ndarray, Bbox]]  # region i → ((H, W) bool mask, bbox)


def make_segments(sample: Sample, config: SegmentConfig) -> list[Segment] | Reject:
    """Segments of one sample in mask order (instance / class ids ascending, annotations as listed).

    The mask is read as `sample.mask_kind` says (ingest decided it); no mask kind → superpixels. Each
    segment records the kind that cut it. Segments below `min_area` are dropped and at most `max_segments`
    (the largest) kept; a mask with no labelled pixel is EMPTY_MASK, one with nothing left is NO_SEGMENTS,
    a malformed one BAD_ANNOTATION.
    """
    try:
        regions = _regions(sample, config)
        kept = _select(regions.areas, config)
    except RejectError as exc:
        return exc.to_reject(sample.shard, sample.key)
    kind = sample.mask_kind.value if sample.mask_kind is not None else SUPERPIXEL
    return [_segment(j, *regions.draw(i), regions.labels[i], int(regions.areas[i]), kind) for j, i in enumerate(kept)]


def superpixel_segments(image: np.ndarray, config: SegmentConfig) -> list[np.ndarray]:
    """Class-agnostic Felzenszwalb superpixels of an (H, W, 3) uint8 image: disjoint (H, W) bool masks covering it."""
    regions = _label_map_regions(superpixel_labels(image, config), {}, exclude=None)
    return [regions.draw(i)[0] for i in range(len(regions.areas))]


def _regions(sample: Sample, config: SegmentConfig) -> _Regions:
    """Candidate regions of the sample's mask kind; superpixels when it has none."""
    kind, mask, meta = sample.mask_kind, sample.mask, sample.meta
    if kind is MaskKind.INSTANCE:
        return _label_map_regions(mask, _instance_names(meta), exclude=0)
    if kind is MaskKind.CLASS:
        return _label_map_regions(mask, _class_names(meta), exclude=config.ignore_value)
    if kind is MaskKind.BINARY:
        return _binary_regions(mask, meta)
    if kind is MaskKind.RLE:
        return _rle_regions(sample.annotations, sample.image.shape[:2])
    return _label_map_regions(superpixel_labels(sample.image, config), {}, exclude=None)


def _select(areas: np.ndarray, config: SegmentConfig) -> np.ndarray:
    """Indices of the regions to keep, ascending: area ≥ min_area, the `max_segments` largest (ties: first)."""
    if not areas.any():
        raise RejectError(
            RejectReason.EMPTY_MASK,
            "no labelled pixel: the mask is all 0 / ignore_value, or no annotation covers any pixel",
        )
    kept = np.flatnonzero((areas >= config.min_area) & (areas > 0))
    if not kept.size:
        raise RejectError(
            RejectReason.NO_SEGMENTS,
            f"all {len(areas)} segments are below min_area={config.min_area} px (largest {areas.max()} px); "
            "lower SegmentConfig.min_area to keep them",
        )
    if kept.size > config.max_segments:
        largest = np.argsort(-areas[kept], kind="stable")[: config.max_segments]
        kept = np.sort(kept[largest])
    return kept


def _segment(index: int, mask: np.ndarray, bbox: Bbox, label: str | None, area: int, kind: str) -> Segment:
    """A Segment with its COCO RLE ({"size": [H, W], "counts": str})."""
    encoded = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    source = LabelSource.GROUND_TRUTH if label is not None else LabelSource.NONE
    rle = {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}
    return Segment(index=index, mask=mask, label=label, label_source=source, bbox=bbox, area=area, rle=rle,
                   mask_kind=kind)


def _bbox(mask: np.ndarray) -> Bbox:
    """XYXY bbox (max exclusive) of a non-empty (H, W) bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# ----------------------------------------------------------------------------------------- label maps


def _label_map_regions(labels: np.ndarray, names: dict[int, str], exclude: int | None) -> _Regions:
    """One region per value present in an (H, W) non-negative int map, ascending, except `exclude`.

    Areas come from one bincount and boxes from one find_objects pass, whatever the number of ids.
    """
    counts = np.bincount(labels.ravel())
    ids = np.flatnonzero(counts)
    if exclude is not None:
        ids = ids[ids != exclude]
    boxes = ndimage.find_objects(labels.astype(np.int32) + 1)  # +1: find_objects skips 0, a real id here

    def draw(i: int) -> tuple[np.ndarray, Bbox]:
        value = ids[i]
        rows, cols = boxes[value]
        mask = np.zeros(labels.shape, dtype=bool)
        mask[rows, cols] = labels[rows, cols] == value
        return mask, (cols.start, rows.start, cols.stop, rows.stop)

    return _Regions(counts[ids].astype(np.int64), [names.get(int(v)) for v in ids], draw)


def _instance_names(meta: dict[str, Any]) -> dict[int, str]:
    """{instance id: label} from the json's `segments` [{id, label}]."""
    entries = meta.get("segments", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "id" in e for e in entries):
        raise RejectError(RejectReason.BAD_ANNOTATION, "json `segments` must be a list of {id, label} objects")
    return _names({e["id"]: e.get("label") for e in entries}, "segments")


def _class_names(meta: dict[str, Any]) -> dict[int, str]:
    """{class index: name} from the json's `classes` {index: name} (keys str or int)."""
    classes = meta.get("classes", {})
    if not isinstance(classes, dict):
        raise RejectError(RejectReason.BAD_ANNOTATION, "json `classes` must be an object {index: name}")
    return _names(classes, "classes")


def _names(raw: dict[Any, Any], field: str) -> dict[int, str]:
    """{int id: str name}; entries whose name is null are left out (their segments stay unlabelled)."""
    try:
        return {int(key): str(name) for key, name in raw.items() if name is not None}
    except (TypeError, ValueError) as exc:
        raise RejectError(RejectReason.BAD_ANNOTATION, f"json `{field}` has a non-integer id: {exc}") from exc


def _binary_regions(mask: np.ndarray, meta: dict[str, Any]) -> _Regions:
    """The non-zero pixels as one region, labelled by the json's `label` or "foreground"."""
    foreground = mask != 0
    label = str(meta.get("label") or "foreground")
    return _Regions(np.array([np.count_nonzero(foreground)]), [label], lambda _: (foreground, _bbox(foreground)))


def superpixel_labels(image: np.ndarray, config: SegmentConfig, max_side: int = _SUPERPIXEL_SIDE) -> np.ndarray:
    """(H, W) int32 Felzenszwalb label map of an (H, W, 3) uint8 image, computed on a bilinear copy whose long
    side is at most `max_side` px (the builder's 256 by default) and upsampled nearest."""
    if max_side < 1:
        raise ValueError(f"superpixel max_side must be ≥ 1 pixel, got {max_side}")
    height, width = image.shape[:2]
    shrink = max_side / max(height, width)
    small = image
    if shrink < 1:
        size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
        small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    labels = felzenszwalb(
        small,
        scale=config.superpixel_scale,
        sigma=config.superpixel_sigma,
        min_size=config.superpixel_min_size,
        channel_axis=-1,
    )
    rows = np.arange(height) * small.shape[0] // height
    cols = np.arange(width) * small.shape[1] // width
    return labels[rows[:, None], cols[None, :]].astype(np.int32)



# ----------------------------------------------------------------------------------------- COCO RLE


def _rle_regions(annotations: list[dict[str, Any]], size: tuple[int, int]) -> _Regions:
    """One region per annotation, in order (RLE or polygon `segmentation`, optional `label`)."""
    runs = [_annotation_runs(ann, i, size) for i, ann in enumerate(annotations)]  # each checked to be a dict
    areas = np.array([r[1::2].sum() for r in runs], dtype=np.int64)  # odd runs are foreground
    labels = [None if ann.get("label") is None else str(ann["label"]) for ann in annotations]

    def draw(i: int) -> tuple[np.ndarray, Bbox]:
        # Decoded here from the validated runs (column-major, background first), not by pycocotools.
        values = np.repeat(np.arange(runs[i].size) % 2 == 1, runs[i])
        mask = np.ascontiguousarray(values.reshape(size[1], size[0]).T)
        return mask, _bbox(mask)

    return _Regions(areas, labels, draw)


def _bad(index: int, problem: str) -> RejectError:
    return RejectError(RejectReason.BAD_ANNOTATION, f"rle.json annotation {index} {problem}")


def _annotation_runs(annotation: dict[str, Any], index: int, size: tuple[int, int]) -> np.ndarray:
    """Run lengths (column-major, background first) of one annotation, checked to cover the image exactly."""
    height, width = size
    segmentation = annotation.get("segmentation") if isinstance(annotation, dict) else None
    try:
        if isinstance(segmentation, dict):
            runs = _rle_runs(segmentation, size)
        elif isinstance(segmentation, list) and segmentation:
            runs = _polygon_runs(segmentation, size)
        else:
            raise ValueError("no RLE or polygon `segmentation`")
    except (ValueError, UnicodeEncodeError) as exc:
        raise _bad(index, f"is malformed: {exc}") from exc
    if runs.min() < 0 or runs.sum() != height * width:
        raise _bad(index, f"has run lengths that do not cover the {height}x{width} image exactly")
    return runs


def _rle_runs(segmentation: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """Run lengths of {"size": [H, W], "counts": str | list[int]} (compressed or uncompressed RLE)."""
    given, counts = segmentation.get("size"), segmentation.get("counts")
    if not isinstance(given, (list, tuple)) or list(given) != list(size):
        raise ValueError(f"RLE size {given} is not the image size {list(size)} (H, W)")
    if isinstance(counts, str):
        return _string_runs(counts.encode("ascii"))
    runs = np.asarray(counts) if isinstance(counts, list) else None
    if runs is None or runs.ndim != 1 or runs.size == 0 or runs.dtype.kind not in "iu":
        raise ValueError("RLE counts must be a string or a flat list of integers")
    return runs


def _polygon_runs(polygons: list[Any], size: tuple[int, int]) -> np.ndarray:
    """Run lengths of the union of polygons [[x0, y0, x1, y1, ...], ...] (pixel coordinates)."""
    checked = []
    for polygon in polygons:
        try:
            coords = np.asarray(polygon, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a polygon is not a list of numbers ({exc})") from exc
        if coords.ndim != 1 or coords.size < 6 or coords.size % 2 or not np.isfinite(coords).all():
            raise ValueError("a polygon is not [x0, y0, x1, y1, x2, y2, ...] (3+ finite points)")
        checked.append(coords.tolist())
    return _string_runs(mask_utils.merge(mask_utils.frPyObjects(checked, *size))["counts"])


def _string_runs(counts: bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (pycocotools' rleFrString, vectorised)."""
    chars = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0 or chars.min() < 0 or chars.max() > 63:
        raise ValueError("characters outside the COCO RLE alphabet")
    more = (chars & 0x20) != 0
    if more[-1]:
        raise ValueError("string ends inside a run length")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 7:
        raise ValueError("run length too long")
    shifts = 5 * (np.arange(chars.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((chars & 0x1F) << shifts, starts)
    values -= np.where(chars[ends] & 0x10, 1 << (5 * lengths), 0)  # sign bit of the last character
    # Runs from the fourth on are stored as differences to the run two before.
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


# ----------------------------------------------------------------------------------------- label report


# Why segments cut by each kind have no label, and the fix; binary masks are always labelled ("foreground").
_UNLABELLED = {
    SUPERPIXEL: ("from samples without a usable mask, cut into superpixels",
                 "--on-missing-mask reject drops such samples instead"),
    MaskKind.INSTANCE.value: ("from instance ids the json's `segments` does not name",
                              "instance masks need json `segments` [{id, label}]"),
    MaskKind.CLASS.value: ("from class indices missing from the json's `classes`",
                           "class masks need json `classes` {index: name}"),
    MaskKind.RLE.value: ("from rle.json annotations without a `label`", "give each annotation a `label`"),
}


def unlabelled_warning(labelled: int, unlabelled_by_kind: dict[str, int], mask_kind: MaskKind) -> str | None:
    """What to tell the user when a build that was given masks produced unlabelled segments, else None.

    A build was given masks when `mask_kind` names a format, or (auto) when any segment was cut from a
    mask; a mask-free corpus built with auto gives unlabelled superpixels by design and no warning.
    """
    unlabelled = sum(unlabelled_by_kind.values())
    from_masks = labelled > 0 or any(kind != SUPERPIXEL for kind in unlabelled_by_kind)
    if not unlabelled or mask_kind is MaskKind.NONE or (mask_kind is MaskKind.AUTO and not from_masks):
        return None
    unknown = ("of an unknown kind", "check the corpus")
    causes = [(n, *_UNLABELLED.get(kind, unknown)) for kind, n in sorted(unlabelled_by_kind.items())]
    why = "; ".join(f"{n} {cause}" for n, cause, _ in causes)
    fixes = "; ".join(fix for _, _, fix in causes)
    kind_hint = "" if mask_kind is MaskKind.AUTO else f" (or --mask-kind auto instead of {mask_kind.value})"
    return (f"{unlabelled} of {labelled + unlabelled} segments have NO LABEL from their masks: {why}. Fix: {fixes}{kind_hint}; "
            "see docs/CORPUS.md")
