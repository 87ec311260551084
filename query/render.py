"""What a query returns and how it is drawn: `SegmentationResult` (label map, score map, per-region entries with
COCO RLE), `assemble_result` that builds one from regions, and renderers (the label map as a PNG; the image
overlaid with one colour per label and outlined; a legend panel under an overlay).

A label's colour is a function of the label text alone (`label_colour`), never of its position in a request, so
"cat" is drawn in the same colour in every answer, on the page (which takes the colours from the answer's legend)
and in the overlays the CLI writes.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
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
                    labels: np.ndarray | None = None, size: tuple[int, int] | None = None) -> SegmentationResult:
    """A result from (n, h, w) bool disjoint region masks, (n,) class numbers (0 = background, i = classes[i - 1])
    and (n,) scores; pixels outside every region are 0 with score 0. `spec` names the encoder (and says untrained).
    labels: the same regions as an (h, w) int map of region numbers (-1 = no region), when the caller has it;
    it replaces a pass over the whole mask stack. size: the (H, W) of the image the regions stand for when the
    masks were made at a smaller working size: the region map is upsampled nearest to it (as superpixels are), so
    the label map, score map and region RLEs are at the image's size; no (n, H, W) stack is ever made."""
    if masks.ndim != 3 or len(assigned) != len(masks) or len(scores) != len(masks):
        raise ValueError(f"{len(assigned)} classes and {len(scores)} scores for masks of shape {masks.shape}")
    n, shape = len(masks), masks.shape[1:]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != shape or labels.dtype.kind not in "ui" or (labels.size and int(labels.max()) >= n):
            raise ValueError(f"region label map {labels.shape} {labels.dtype} does not match masks {masks.shape}")
        region = labels.astype(np.int32) + 1
    elif n:
        region = np.where(masks.any(axis=0), masks.argmax(axis=0) + 1, 0).astype(np.int32)
    else:
        region = np.zeros(shape, np.int32)
    size = size or shape
    entries = [RegionResult(rle=rle, bbox=bbox, area=area, label=classes[assigned[i] - 1] if assigned[i] else None,
                            score=float(scores[i])) for i, (rle, bbox, area) in enumerate(region_rles(region, n, size))]
    region = upsample_nearest(region, size)  # 0 = no region, i + 1 = region i
    assigned = np.asarray(assigned, dtype=np.int64)
    label_map = np.concatenate([[0], assigned]).astype(np.uint16)[region]
    score_map = np.concatenate([[0], np.asarray(scores, dtype=np.float32)]).astype(np.float32)[region]
    return SegmentationResult(mode=mode, classes=list(classes), label_map=label_map, score_map=score_map,
                              regions=entries, encoder=spec.name, untrained=spec.untrained, exists=exists,
                              details=details or {})


def upsample_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (h, w) map resized nearest to size (H, W): pixel (r, c) takes (r·h // H, c·w // W), the rule
    superpixel_labels upsamples by (the map itself when the size is its own; always C-contiguous)."""
    height, width = size
    if (height, width) == labels.shape:
        return np.ascontiguousarray(labels)
    rows = np.arange(height) * labels.shape[0] // height
    cols = np.arange(width) * labels.shape[1] // width
    return labels[rows[:, None], cols[None, :]]


def region_rles(region: np.ndarray, n: int, size: tuple[int, int] | None = None
                ) -> list[tuple[dict[str, Any], tuple[int, int, int, int], int]]:
    """(COCO RLE {"size": [H, W], "counts": str}, bbox XYXY, area) of regions 0..n-1 of an (h, w) map holding
    i + 1 for region i (0 = none), upsampled nearest to size (H, W) (default: its own): runs read off the map in
    COCO's column-major order, so the cost is one pass over the H × W pixels whatever n (no (n, H, W) mask
    stack); equal to pycocotools' encode of each region's mask."""
    if not n:
        return []
    height, width = size or region.shape
    # The transposed map upsampled is the column-major pixel order, contiguous: no transpose of the big map.
    flat = upsample_nearest(np.ascontiguousarray(region.T), (width, height)).ravel()
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    ends = np.append(starts[1:], flat.size)
    values = flat[starts]
    order = np.argsort(values, kind="stable")  # runs grouped by region, in pixel order inside each
    bounds = np.searchsorted(values[order], np.arange(1, n + 2))
    encoded, areas = [], []
    for i in range(n):
        runs = order[bounds[i]:bounds[i + 1]]
        begin, end = starts[runs], ends[runs]
        counts = np.empty(2 * len(runs) + 1, np.int64)
        counts[0::2] = np.append(begin, flat.size) - np.append(0, end)  # the gaps before, between and after
        counts[1::2] = end - begin
        if len(counts) > 1 and counts[-1] == 0:
            counts = counts[:-1]  # pycocotools leaves out a trailing empty gap
        encoded.append(mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width))
        areas.append(int((end - begin).sum()))
    boxes = mask_utils.toBbox(encoded)  # XYWH
    return [({"size": [height, width], "counts": rle["counts"].decode("ascii")},
             (int(x), int(y), int(x + w), int(y + h)), area)
            for rle, (x, y, w, h), area in zip(encoded, boxes.tolist(), areas)]


# ----------------------------------------------------------------------------------------- renderers


# Salt of the colour hash: picked among 2000 so the synthetic corpus's 13 classes are pairwise >= 12 CIEDE2000 apart
# (the median salt gives 4). Other label sets can get close colours; outlines, the legend and the page's hover
# tell them apart.
_COLOUR_SALT = (190).to_bytes(8, "little")
LEGEND_KEY = "refbank:legend"  # PNG text chunk of an overlay written with its legend: JSON [{label, color}]


def label_colour(label: str | None) -> tuple[int, int, int]:
    """RGB of a label: hue, saturation (0.55-1) and value (0.6-1) from a BLAKE2b hash of its UTF-8 text, so the
    same label always gets the same colour; None (background) is black."""
    if label is None:
        return (0, 0, 0)
    digest = hashlib.blake2b(label.encode("utf-8"), digest_size=4, salt=_COLOUR_SALT).digest()
    rgb = colorsys.hsv_to_rgb(int.from_bytes(digest[:2], "big") / 65536, 0.55 + 0.45 * digest[2] / 255,
                              0.6 + 0.4 * digest[3] / 255)
    return tuple(round(255 * c) for c in rgb)


def hex_colour(label: str | None) -> str:
    """label_colour as "#rrggbb"."""
    return "#{:02x}{:02x}{:02x}".format(*label_colour(label))


def class_colours(classes: Sequence[str]) -> np.ndarray:
    """(len(classes) + 1, 3) uint8: row 0 black (background), row i the colour of classes[i - 1]."""
    return np.array([label_colour(None)] + [label_colour(c) for c in classes], dtype=np.uint8)


def legend(result: SegmentationResult) -> list[dict[str, Any]]:
    """One entry per label-map value: value, label (None = background), "#rrggbb" colour, pixel count."""
    pixels = np.bincount(result.label_map.ravel(), minlength=len(result.classes) + 1)
    labels = [None, *result.classes]
    return [{"value": v, "label": labels[v], "color": hex_colour(labels[v]), "pixels": int(pixels[v])}
            for v in range(len(labels))]


def label_map_png(result: SegmentationResult | np.ndarray) -> bytes:
    """PNG of the (H, W) label map, lossless: 8-bit greyscale when every value is < 256, else 16-bit."""
    labels = result.label_map if isinstance(result, SegmentationResult) else np.asarray(result)
    if labels.ndim != 2 or labels.dtype.kind not in "ui" or 0 in labels.shape:
        raise ValueError(f"a label map is a non-empty (H, W) integer array, got {labels.shape} {labels.dtype}")
    if labels.min() < 0 or labels.max() > 65535:
        raise ValueError("label map values must lie in [0, 65535]")
    array = labels.astype(np.uint8 if labels.max() < 256 else np.uint16)
    return _png(Image.fromarray(array))


def outline(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: labelled pixels (> 0) with a 4-neighbour of another value, i.e. the inner edge of each label's
    area (both sides of a border between two labels)."""
    edge = np.zeros(labels.shape, dtype=bool)
    across = labels[:, 1:] != labels[:, :-1]
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    down = labels[1:, :] != labels[:-1, :]
    edge[1:, :] |= down
    edge[:-1, :] |= down
    return edge & (labels > 0)


_BAND_ROWS = 256  # overlay rows blended at a time: a 4096-px-wide band's float32 temporaries are ~12 MB each


def overlay(image: np.ndarray, labels: np.ndarray, classes: Sequence[str], alpha: float = 0.5,
            outlines: bool = True) -> np.ndarray:
    """(H, W, 3) uint8: the (H, W, 3) uint8 image blended with its (H, W) label map (i = classes[i - 1]): labelled
    pixels become round((1 − alpha)·pixel + alpha·colour) with label_colour's colours, and with `outlines` each
    label's edge pixels take the full colour; background (0) pixels are left as they are."""
    image = check_image(image)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"label map {labels.shape} and image {image.shape[:2]} (H, W) differ in size")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if labels.size and int(labels.max()) > len(classes):
        raise ValueError(f"label map value {int(labels.max())} has no class: {len(classes)} classes given")
    palette = class_colours(classes).astype(np.float32)
    edge = outline(labels) if outlines else None
    out = image.copy()
    for top in range(0, labels.shape[0], _BAND_ROWS):  # float32 temporaries of one band, not of the whole image
        rows = slice(top, top + _BAND_ROWS)
        band, colours = labels[rows], palette[labels[rows]]
        blended = np.rint((1 - alpha) * image[rows].astype(np.float32) + alpha * colours)
        if edge is not None:
            blended[edge[rows]] = colours[edge[rows]]
        out[rows] = np.where((band > 0)[:, :, None], blended, image[rows])
    return out


def overlay_png(image: np.ndarray, result: SegmentationResult, alpha: float = 0.5, outlines: bool = True) -> bytes:
    """RGB PNG of `overlay` for a result (its label map and classes)."""
    return _png(Image.fromarray(overlay(image, result.label_map, result.classes, alpha, outlines), "RGB"))


def with_legend(image: np.ndarray | Image.Image, entries: Sequence[dict[str, Any]]) -> Image.Image:
    """An overlay with a legend panel below it: a swatch and the label of each entry (as `legend` gives them) that
    has a label and pixels, so the colours can be read as classes."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    shown = _shown(entries)
    font = ImageFont.load_default(size=12)
    row, pad = 16, 4
    width = max([picture.width] + [2 * pad + row + int(font.getlength(e["label"])) for e in shown])
    canvas = Image.new("RGB", (width, picture.height + 2 * pad + row * len(shown)), "white")
    canvas.paste(picture.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, entry in enumerate(shown):
        top = picture.height + pad + i * row
        draw.rectangle((pad, top + 2, pad + row - 4, top + row - 2), fill=entry["color"], outline="black")
        draw.text((2 * pad + row - 4, top + 1), entry["label"], fill="black", font=font)
    return canvas


def legend_png(image: np.ndarray | Image.Image, entries: Sequence[dict[str, Any]]) -> bytes:
    """PNG of `with_legend`; the legend is also stored as JSON [{label, color}] in the text chunk LEGEND_KEY."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text(LEGEND_KEY, json.dumps([{"label": e["label"], "color": e["color"]} for e in _shown(entries)]))
    buffer = io.BytesIO()
    with_legend(image, entries).save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()


def _shown(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("label") is not None and e.get("pixels", 1) > 0]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
