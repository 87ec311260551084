"""What a query returns and how it is drawn: `SegmentationResult` (label map, score map, per-region entries with
COCO RLE), `assemble_result` that builds one from regions, and PNG renderers (the label map; the image
overlaid with one colour per class).

The palette is fixed (PASCAL VOC's bit-interleaved colour map: class i always gets the same colour, 0 is
black), so renders are deterministic and comparable across requests.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from bank_builder.encoders import EncoderSpec
from query.regions import check_image

Mode = Literal["vocabulary", "open_set", "reference", "foreground"]


@dataclass
class RegionResult:
    """One region: COCO RLE {"size": [H, W], "counts": str}, bbox XYXY pixels (max exclusive), area in pixels,
    label (None = background / unlabelled) and score, by mode: vocabulary = cosine to the class prototype,
    open_set = kNN vote share, reference = cosine to the reference − cosine to the nearest other bank label,
    foreground = foreground score in [0, 1]."""

    rle: dict[str, Any]
    bbox: tuple[int, int, int, int]
    area: int
    label: str | None
    score: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"rle": self.rle, "bbox": list(self.bbox), "area": self.area, "label": self.label, "score": self.score}


@dataclass(eq=False)
class SegmentationResult:
    """What a mode returns for one image.

    label_map: (H, W) uint16, 0 = background / unlabelled, i = classes[i - 1]. score_map: (H, W) float32, each
    pixel its region's score. regions: every region, in region order. exists: reference mode only — whether any
    region matched a reference (False = the calibrated "no target"; None in other modes). untrained: the encoder
    ran with untrained weights, so labels carry no learned semantics. details: mode-specific facts (prototypes,
    thresholds).
    """

    mode: Mode
    classes: list[str]
    label_map: np.ndarray
    score_map: np.ndarray
    regions: list[RegionResult]
    encoder: str
    untrained: bool
    exists: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict without the dense maps (render them with query.render)."""
        return {"mode": self.mode, "classes": list(self.classes), "size": list(self.label_map.shape),
                "regions": [r.to_dict() for r in self.regions], "exists": self.exists, "encoder": self.encoder,
                "untrained": self.untrained, "details": self.details}


def assemble_result(mode: Mode, masks: np.ndarray, assigned: np.ndarray, scores: np.ndarray, classes: list[str],
                    spec: EncoderSpec, exists: bool | None = None, details: dict[str, Any] | None = None,
                    labels: np.ndarray | None = None) -> SegmentationResult:
    """A result from (n, H, W) bool disjoint region masks, (n,) class numbers (0 = background, i = classes[i - 1])
    and (n,) scores; pixels outside every region are 0 with score 0. `spec` names the encoder (and says untrained).
    labels: the same regions as an (H, W) int map of region numbers (-1 = no region), when the caller has it;
    it replaces a pass over the whole mask stack."""
    if masks.ndim != 3 or len(assigned) != len(masks) or len(scores) != len(masks):
        raise ValueError(f"{len(assigned)} classes and {len(scores)} scores for masks of shape {masks.shape}")
    height, width = masks.shape[1:]
    assigned = np.asarray(assigned, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (height, width) or labels.dtype.kind not in "ui" or (
                labels.size and int(labels.max()) >= len(masks)):
            raise ValueError(f"region label map {labels.shape} {labels.dtype} does not match masks {masks.shape}")
        covered = labels >= 0
        owner = np.where(covered, labels, 0)
        areas = np.bincount(labels[covered].astype(np.int64), minlength=len(masks))
    else:
        owner = masks.argmax(axis=0) if len(masks) else np.zeros((height, width), np.int64)
        covered = masks.any(axis=0)
        areas = masks.reshape(len(masks), -1).sum(axis=1)
    label_map = np.where(covered, assigned[owner] if len(masks) else 0, 0).astype(np.uint16)
    score_map = np.where(covered, scores[owner] if len(masks) else 0, 0).astype(np.float32)
    entries = []
    if len(masks):
        encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        boxes = mask_utils.toBbox(encoded)  # XYWH
        for i, rle in enumerate(encoded):
            x, y, w, h = (int(v) for v in boxes[i])
            entries.append(RegionResult(
                rle={"size": [height, width], "counts": rle["counts"].decode("ascii")}, bbox=(x, y, x + w, y + h),
                area=int(areas[i]), label=classes[assigned[i] - 1] if assigned[i] else None, score=float(scores[i])))
    return SegmentationResult(mode=mode, classes=list(classes), label_map=label_map, score_map=score_map,
                              regions=entries, encoder=spec.name, untrained=spec.untrained, exists=exists,
                              details=details or {})


# ----------------------------------------------------------------------------------------- renderers


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours for label values 0..n-1 (0 = black), the PASCAL VOC colour map."""
    values = np.arange(n)
    colours = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (values >> (3 * shift + channel)) & 1
            colours[:, channel] |= bit << (7 - shift)
    return colours.astype(np.uint8)


def label_map_png(result: SegmentationResult | np.ndarray) -> bytes:
    """PNG of the (H, W) label map, lossless: 8-bit greyscale when every value is < 256, else 16-bit."""
    labels = result.label_map if isinstance(result, SegmentationResult) else np.asarray(result)
    if labels.ndim != 2 or labels.dtype.kind not in "ui" or 0 in labels.shape:
        raise ValueError(f"a label map is a non-empty (H, W) integer array, got {labels.shape} {labels.dtype}")
    if labels.min() < 0 or labels.max() > 65535:
        raise ValueError("label map values must lie in [0, 65535]")
    array = labels.astype(np.uint8 if labels.max() < 256 else np.uint16)
    return _png(Image.fromarray(array))


def overlay_png(image: np.ndarray, result: SegmentationResult | np.ndarray, alpha: float = 0.5) -> bytes:
    """RGB PNG of an (H, W, 3) uint8 image blended with its label map: labelled pixels become
    (1 − alpha)·pixel + alpha·palette[label]; background (0) pixels are left as they are."""
    image = check_image(image)
    labels = result.label_map if isinstance(result, SegmentationResult) else np.asarray(result)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"label map {labels.shape} and image {image.shape[:2]} (H, W) differ in size")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    colours = palette(int(labels.max()) + 1).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours[labels]
    out = np.where((labels > 0)[:, :, None], np.rint(blended), image).astype(np.uint8)
    return _png(Image.fromarray(out, "RGB"))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
