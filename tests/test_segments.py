"""Segments stage: every mask kind on hand-made masks, filtering, rejects, and the superpixel fallback."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bank_builder.config import MaskKind, SegmentConfig
from bank_builder.records import SUPERPIXEL, LabelSource, Reject, RejectReason, Sample, Segment
from bank_builder.segments import make_segments, superpixel_segments, unlabelled_warning

# pycocotools' decode (used here as the reference) trips a numpy 2 copy-keyword DeprecationWarning.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 20, 30
ANY = SegmentConfig(min_area=1)
GT, NONE = LabelSource.GROUND_TRUTH, LabelSource.NONE


def sample(kind: MaskKind | None, mask: np.ndarray | None = None, annotations: list | None = None,
           meta: dict | None = None) -> Sample:
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return Sample("s.tar", "k", 0, image, mask_kind=kind, mask=mask, annotations=annotations, meta=meta or {})


def segments(kind: MaskKind, config: SegmentConfig = ANY, **fields: Any) -> list[Segment]:
    result = make_segments(sample(kind, **fields), config)
    assert isinstance(result, list), result
    assert [s.index for s in result] == list(range(len(result)))
    assert {s.mask_kind for s in result} <= {kind.value}  # each segment records the kind that cut it
    for s in result:  # every segment is self-consistent: mask, area, bbox, and RLE agree
        assert s.mask.shape == (H, W) and s.mask.dtype == bool and s.area == s.mask.sum()
        x0, y0, x1, y1 = s.bbox
        assert s.mask[y0:y1, x0:x1].sum() == s.area and s.mask[y0, x0:x1].any() and s.mask[y1 - 1, x0:x1].any()
        assert s.mask[y0:y1, x0].any() and s.mask[y0:y1, x1 - 1].any()
        assert isinstance(s.rle["counts"], str) and s.rle["size"] == [H, W]
        decoded = mask_utils.decode({"size": s.rle["size"], "counts": s.rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), s.mask)
    return result


def reject(kind: MaskKind, config: SegmentConfig = ANY, **fields: Any) -> Reject:
    result = make_segments(sample(kind, **fields), config)
    assert isinstance(result, Reject), result
    assert (result.shard, result.key) == ("s.tar", "k") and result.detail
    return result


def rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ----------------------------------------------------------------------------------------- mask PNGs


@pytest.mark.parametrize("dtype, ids", [(np.uint8, (3, 5, 7)), (np.uint16, (300, 1000, 65535))])
def test_instance_masks(dtype, ids):
    mask = np.zeros((H, W), dtype=dtype)
    mask[2:6, 3:9] = ids[2]  # written first: order in the list comes from the id, not the pixels
    mask[10:20, 0:5] = ids[0]
    mask[0:1, 29:30] = ids[1]
    meta = {"segments": [{"id": ids[0], "label": "cat"}, {"id": ids[2], "label": "dog"}, {"id": 99, "label": "x"}]}

    result = segments(MaskKind.INSTANCE, mask=mask, meta=meta)

    assert [(s.label, s.label_source, s.area, s.bbox) for s in result] == [
        ("cat", GT, 50, (0, 10, 5, 20)),
        (None, NONE, 1, (29, 0, 30, 1)),
        ("dog", GT, 24, (3, 2, 9, 6)),
    ]
    assert np.array_equal(result[0].mask, rect(10, 20, 0, 5)) and np.array_equal(result[2].mask, rect(2, 6, 3, 9))


def test_class_masks_keep_class_zero_and_skip_ignore():
    mask = np.full((H, W), 255, dtype=np.uint8)
    mask[:, :10] = 0
    mask[:5, 10:20] = 2
    mask[15:, 25:] = 4
    meta = {"classes": {"0": "background", 2: "road"}}

    result = segments(MaskKind.CLASS, mask=mask, meta=meta)

    assert [(s.label, s.label_source, s.area, s.bbox) for s in result] == [
        ("background", GT, 200, (0, 0, 10, 20)),
        ("road", GT, 50, (10, 0, 20, 5)),
        (None, NONE, 25, (25, 15, 30, 20)),
    ]
    other_ignore = segments(MaskKind.CLASS, SegmentConfig(min_area=1, ignore_value=0), mask=mask, meta=meta)
    assert [s.label for s in other_ignore] == ["road", None, None] and other_ignore[2].area == 325


def test_binary_masks():
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[4:8, 2:12] = 255
    mask[15, 20] = 1  # any non-zero value is foreground
    expected = rect(4, 8, 2, 12)
    expected[15, 20] = True

    [plain] = segments(MaskKind.BINARY, mask=mask)
    [named] = segments(MaskKind.BINARY, mask=mask, meta={"label": "person"})

    assert (plain.label, plain.label_source, plain.area, plain.bbox) == ("foreground", GT, 41, (2, 4, 21, 16))
    assert np.array_equal(plain.mask, expected) and named.label == "person"


# ----------------------------------------------------------------------------------------- COCO RLE


def compressed(mask: np.ndarray) -> dict[str, Any]:
    encoded = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def uncompressed(mask: np.ndarray) -> dict[str, Any]:
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flat, [1 - flat[-1]]))))
    return {"size": [H, W], "counts": np.diff(np.concatenate(([0], edges))).tolist()}


def test_rle_annotations_in_every_encoding():
    square = rect(2, 8, 4, 10)
    other = rect(10, 20, 0, 30)
    polygon = [[20.0, 2.0, 27.0, 2.0, 27.0, 7.0, 20.0, 7.0]]
    annotations = [
        {"segmentation": compressed(square), "label": "box", "bbox": [4, 2, 6, 6], "area": 36},
        {"segmentation": uncompressed(other)},
        {"segmentation": polygon, "label": "poly"},
    ]

    result = segments(MaskKind.RLE, annotations=annotations)

    assert [(s.label, s.label_source) for s in result] == [("box", GT), (None, NONE), ("poly", GT)]
    assert np.array_equal(result[0].mask, square) and result[0].bbox == (4, 2, 10, 8)
    assert np.array_equal(result[1].mask, other) and result[1].area == 300
    reference = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, H, W))).astype(bool)
    assert np.array_equal(result[2].mask, reference) and result[2].bbox == (20, 2, 27, 7) and result[2].area == 35


def test_rle_strings_of_irregular_masks_round_trip():
    rng = np.random.default_rng(1)
    masks = [rng.random((H, W)) < p for p in (0.05, 0.5, 0.95)] + [np.ones((H, W), bool)]
    annotations = [{"segmentation": encoding(m)} for m in masks for encoding in (compressed, uncompressed)]

    result = segments(MaskKind.RLE, annotations=annotations)

    assert len(result) == len(annotations)
    for s, m in zip(result, [m for m in masks for _ in range(2)]):
        assert np.array_equal(s.mask, m)


_GOOD = compressed(rect(2, 8, 4, 10))
_BAD_ANNOTATIONS = {
    "no segmentation": {"label": "x"},
    "not an object": ["segmentation"],
    "size mismatch": {"segmentation": {"size": [H + 1, W], "counts": _GOOD["counts"]}},
    "bad characters": {"segmentation": {"size": [H, W], "counts": "!!!"}},
    "string too short": {"segmentation": {"size": [H, W], "counts": _GOOD["counts"][:-2]}},
    "list too short": {"segmentation": {"size": [H, W], "counts": [5, 10]}},
    "list too long": {"segmentation": {"size": [H, W], "counts": [5, 10, H * W]}},
    "negative run": {"segmentation": {"size": [H, W], "counts": [-5, H * W + 5]}},
    "float counts": {"segmentation": {"size": [H, W], "counts": [1.5, H * W - 1.5]}},
    "counts type": {"segmentation": {"size": [H, W], "counts": 7}},
    "short polygon": {"segmentation": [[1, 1, 5, 5]]},
    "odd polygon": {"segmentation": [[1, 1, 5, 5, 9, 1, 3]]},
    "text polygon": {"segmentation": [["a", "b", "c", "d", "e", "f"]]},
    "empty polygons": {"segmentation": []},
}


@pytest.mark.parametrize("case", list(_BAD_ANNOTATIONS))
def test_malformed_annotations_are_rejected(case):
    annotations = [{"segmentation": _GOOD}, _BAD_ANNOTATIONS[case]]
    result = reject(MaskKind.RLE, annotations=annotations)
    assert result.reason is RejectReason.BAD_ANNOTATION and "annotation 1" in result.detail


@pytest.mark.parametrize(
    "kind, meta",
    [(MaskKind.INSTANCE, {"segments": {"1": "cat"}}), (MaskKind.CLASS, {"classes": ["road"]}),
     (MaskKind.CLASS, {"classes": {"one": "road"}})],
)
def test_malformed_label_tables_are_rejected(kind, meta):
    mask = rect(0, 10, 0, 10).astype(np.uint8)
    assert reject(kind, mask=mask, meta=meta).reason is RejectReason.BAD_ANNOTATION


# ----------------------------------------------------------------------------------------- filtering


@pytest.mark.parametrize(
    "kind, fields",
    [
        (MaskKind.INSTANCE, {"mask": np.zeros((H, W), np.uint16)}),
        (MaskKind.CLASS, {"mask": np.full((H, W), 255, np.uint8)}),
        (MaskKind.BINARY, {"mask": np.zeros((H, W), np.uint8)}),
        (MaskKind.RLE, {"annotations": []}),
        (MaskKind.RLE, {"annotations": [{"segmentation": compressed(np.zeros((H, W), bool))}]}),
    ],
)
def test_empty_masks(kind, fields):
    assert reject(kind, **fields).reason is RejectReason.EMPTY_MASK


def test_min_area_drops_small_segments():
    mask = np.zeros((H, W), np.uint8)
    mask[0:2, 0:2], mask[5:15, 5:15], mask[18:20, 28:30] = 1, 2, 3  # areas 4, 100, 4

    [kept] = segments(MaskKind.INSTANCE, SegmentConfig(min_area=5), mask=mask)
    assert kept.area == 100 and kept.index == 0

    mask[5:15, 5:15] = 0
    result = reject(MaskKind.INSTANCE, SegmentConfig(min_area=5), mask=mask)
    assert result.reason is RejectReason.NO_SEGMENTS and "all 2 segments" in result.detail


def test_max_segments_keeps_the_largest_in_original_order():
    mask = np.zeros((H, W), np.uint8)
    for value, width in zip(range(1, 6), [1, 3, 2, 4, 4]):  # column bands: areas 20, 60, 40, 80, 80
        start = 5 * value
        mask[:, start : start + width] = value

    result = segments(MaskKind.INSTANCE, SegmentConfig(min_area=1, max_segments=3), mask=mask)
    assert [s.area for s in result] == [60, 80, 80] and [s.index for s in result] == [0, 1, 2]
    assert [s.bbox[0] for s in result] == [10, 20, 25]  # ids 2, 4, 5: picked by size, listed by id

    ties = segments(MaskKind.INSTANCE, SegmentConfig(min_area=1, max_segments=1), mask=mask)
    assert [s.bbox[0] for s in ties] == [20]  # equal areas: the first one wins


def test_many_instance_ids_are_fast_and_capped():
    mask = np.arange(H * W, dtype=np.uint16).reshape(H, W) // 3 + 1  # 200 ids of 3 pixels
    result = segments(MaskKind.INSTANCE, SegmentConfig(min_area=1, max_segments=150), mask=mask)
    assert len(result) == 150 and [s.area for s in result] == [3] * 150
    assert result[0].bbox == (0, 0, 3, 1) and result[-1].bbox == (27, 14, 30, 15)


# ----------------------------------------------------------------------------------------- superpixels


def blocks(height: int, width: int) -> np.ndarray:
    """Four flat colour quadrants with a little noise: clear superpixel boundaries."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (200, 30, 30)
    image[: height // 2, width // 2 :] = (30, 200, 30)
    image[height // 2 :, : width // 2] = (30, 30, 200)
    image[height // 2 :, width // 2 :] = (220, 220, 220)
    noise = np.random.default_rng(2).integers(-5, 6, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def test_superpixels_cover_the_image_and_are_deterministic():
    image = blocks(300, 500)  # downscaled to 256 px on the long side, label map upsampled

    first = superpixel_segments(image, SegmentConfig())
    second = superpixel_segments(image, SegmentConfig())

    assert 4 <= len(first) <= 64
    stacked = np.stack(first)
    assert stacked.shape[1:] == (300, 500) and stacked.dtype == bool
    assert np.array_equal(stacked.sum(axis=0), np.ones((300, 500)))  # disjoint and covering
    assert all(np.array_equal(a, b) for a, b in zip(first, second)) and len(first) == len(second)
    centres = [(75, 125), (75, 375), (225, 125), (225, 375)]
    owners = {next(i for i, m in enumerate(first) if m[y, x]) for y, x in centres}
    assert len(owners) == 4  # segments follow the content: each colour quadrant has its own


def test_unmasked_samples_fall_back_to_superpixels():
    image = blocks(H, W)
    result = make_segments(Sample("s", "k", 0, image, mask=np.ones((H, W), np.uint8)), ANY)  # mask_kind None
    assert isinstance(result, list) and len(result) >= 4
    assert all(s.label is None and s.label_source is NONE and s.mask_kind == SUPERPIXEL for s in result)
    assert sum(s.area for s in result) == H * W


@pytest.mark.parametrize("labelled, kinds, mask_kind, expected", [
    (3, {}, MaskKind.INSTANCE, None),
    (0, {"superpixel": 5}, MaskKind.AUTO, None),  # a mask-free corpus: superpixels by design
    (0, {"superpixel": 5}, MaskKind.NONE, None),
    (3, {"superpixel": 5}, MaskKind.AUTO, "5 from samples without a usable mask"),  # other samples had masks
    (0, {"superpixel": 5}, MaskKind.INSTANCE, "--on-missing-mask reject"),  # the user said there are masks
    (0, {"instance": 7}, MaskKind.AUTO, "json's `segments` does not name"),
    (3, {"class": 2, "rle": 1}, MaskKind.CLASS, "2 from class indices missing from the json's `classes`; 1 from rle"),
])
def test_unlabelled_warning_names_the_cause(labelled, kinds, mask_kind, expected):
    warning = unlabelled_warning(labelled, kinds, mask_kind)
    assert warning is None if expected is None else expected in warning
    if warning:
        assert f"{sum(kinds.values())} of {labelled + sum(kinds.values())} segments have NO LABEL" in warning
