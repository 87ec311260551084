"""Query regions: an image cut into regions (superpixels or the encoder's patch grid), reference prompts
(mask, box, scribble) turned into masks, and region embeddings pooled exactly as the builder pools segments.

Region embeddings go through the builder's own calls (`bank_builder.embed.prepare_image`: squash to the
encoder's S×S input, exact area-weighted soft masks on the g×g grid; the encoder's dense features;
`pool_segments`: mask pooling, float16), as `encode_batch` makes them, so a query region and a bank segment
with the same pixels get the same vector. With merge thresholds, the regions also carry a hierarchy of
larger regions merged from them (query.hierarchy), pooled from the same forward pass. With `refine`, the modes refine their per-pixel maps over the image's colours (query.pamr), so the regions keep
their working-size pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from bank_builder.config import SegmentConfig
from bank_builder.embed import pool_segments, prepare_image
from bank_builder.encoders import Encoder
from bank_builder.segments import superpixel_labels
from query.hierarchy import RegionLevel, adjacent_pairs, check_thresholds, merge_levels
from query.pamr import RefineConfig

RegionKind = Literal["superpixel", "grid"]
Box = tuple[float, float, float, float]  # XYXY pixels, max exclusive
Point = tuple[float, float]  # (x, y) pixels


@dataclass(frozen=True)
class RegionConfig:
    """How a query image is cut into regions.

    kind: "superpixel" (Felzenszwalb with the builder's SegmentConfig superpixel options) or "grid" (one
    region per g×g feature cell of the encoder, i.e. per patch token).
    superpixel_max_side: superpixels are computed on a copy whose long side is at most this many pixels and
    upsampled nearest (the builder uses 256; smaller is faster, with fewer, coarser regions).
    working_side: a larger image is reduced (area average) to this long side, or to the encoder's input size if
    that is larger, before regions are cut, masked and pooled; results are upsampled nearest to the image's size.
    The encoder sees an S×S squash and superpixels are cut at ≤ superpixel_max_side anyway, so little is lost,
    and the masks cost n × working_side² bytes instead of n × H × W.
    merge_thresholds: strictly descending cosines; when given, adjacent regions are merged greedily by the cosine
    of their pooled features and the merge is cut at each threshold (query.hierarchy), and the modes score a
    region by the mean of its scores at those levels. () = regions scored on their own.
    refine: PAMR options (query.pamr); when given, the vocabulary, open-set and foreground modes label pixels,
    not whole regions: region scores painted on pixels are refined over the image's colours, and each region is
    split into the pieces that take one label. None = every region takes one label.
    """

    kind: RegionKind = "superpixel"
    segments: SegmentConfig = field(default_factory=SegmentConfig)
    superpixel_max_side: int = 160
    working_side: int = 256
    merge_thresholds: tuple[float, ...] = ()
    refine: RefineConfig | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("superpixel", "grid"):
            raise ValueError(f"RegionConfig.kind={self.kind!r}: use 'superpixel' or 'grid'")
        object.__setattr__(self, "merge_thresholds", check_thresholds(self.merge_thresholds))
        for name in ("superpixel_max_side", "working_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"RegionConfig.{name} must be ≥ 1 pixel, got {getattr(self, name)}")


@dataclass(eq=False)
class Regions:
    """Regions of one image. masks: (n, h, w) bool, disjoint, covering the image at its working size; embeddings:
    (n, C) float32 L2-normalised (the builder's float16 values widened, so norms are 1 ± 1e-3); labels: the same
    regions as an (h, w) int64 map of region numbers 0..n-1 (None: derived from the masks when needed); size:
    the (H, W) of the image they describe when the masks were made smaller (None: the masks' own size);
    levels: the cuts of a region hierarchy over them (RegionConfig.merge_thresholds), () = none; image: the
    (h, w, 3) uint8 pixels at the masks' size, kept for refinement (RegionConfig.refine), else None."""

    masks: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray | None = None
    size: tuple[int, int] | None = None
    levels: tuple[RegionLevel, ...] = ()
    image: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.masks)

    def label_map(self) -> np.ndarray:
        """(h, w) int64 region number of each pixel at the masks' size (the kept `labels`, else the first mask
        holding the pixel; 0 where none does)."""
        if self.labels is not None:
            return self.labels
        if not len(self.masks):
            return np.zeros(self.masks.shape[1:], np.int64)
        return self.masks.argmax(axis=0)


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """The image if it is (H, W, 3) uint8 RGB with H, W ≥ 1; ValueError naming the fix otherwise."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(f"{what} must be an (H, W, 3) uint8 RGB array, got shape {image.shape} {image.dtype}; "
                         "decode it with PIL and np.asarray(img.convert('RGB'))")
    return image


def grid_labels(height: int, width: int, grid: int) -> np.ndarray:
    """(H, W) int64 region numbers 0..n-1 of the grid cells `grid_masks` returns, in the same order."""
    rows = np.arange(height) * grid // height
    cols = np.arange(width) * grid // width
    return _compact(rows[:, None] * grid + cols[None, :])


def _compact(labels: np.ndarray) -> np.ndarray:
    """An (H, W) non-negative int map renumbered 0..n-1 in ascending order of its values (int64)."""
    present = np.bincount(labels.ravel()) > 0
    lookup = np.cumsum(present) - 1
    return lookup[labels]


def masks_from_labels(labels: np.ndarray) -> np.ndarray:
    """(n, H, W) bool masks of an (H, W) map of region numbers 0..n-1 (region i = pixels numbered i)."""
    n = int(labels.max()) + 1 if labels.size else 0
    return labels[None, :, :] == np.arange(n)[:, None, None]


def grid_masks(height: int, width: int, grid: int) -> np.ndarray:
    """(n ≤ grid², H, W) bool: pixel (r, c) belongs to cell (r·grid // H, c·grid // W) of the encoder's grid
    after the squash to S×S (the cell holding its top-left corner; exact when H, W are multiples of grid);
    cells without a pixel (H or W < grid) are left out."""
    rows = np.arange(height) * grid // height
    cols = np.arange(width) * grid // width
    cell = rows[:, None] * grid + cols[None, :]
    ids = np.unique(cell)
    return cell[None, :, :] == ids[:, None, None]


def region_labels(image: np.ndarray, config: RegionConfig, grid: int) -> np.ndarray:
    """(H, W) int64 region numbers 0..n-1 of an (H, W, 3) uint8 image: superpixels (computed at ≤
    config.superpixel_max_side px long side, upsampled nearest) or the g×g patch grid; every number is used."""
    image = check_image(image)
    if config.kind == "grid":
        return grid_labels(image.shape[0], image.shape[1], grid)
    return _compact(superpixel_labels(image, config.segments, config.superpixel_max_side))


def region_masks(image: np.ndarray, config: RegionConfig, grid: int) -> np.ndarray:
    """(n, H, W) bool disjoint masks covering an (H, W, 3) uint8 image: superpixels or the g×g patch grid
    (region i = the pixels `region_labels` numbers i)."""
    return masks_from_labels(region_labels(image, config, grid))


def embed_masks(encoder: Encoder, image: np.ndarray, masks: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image + n (H, W) bool non-empty masks → (n, C) float32, pooled by the builder's own
    path (prepare_image, one encoder call, pool_segments: float16 values widened to float32)."""
    return _pool(encoder, image, masks)[0]


def _pool(encoder: Encoder, image: np.ndarray, masks: Sequence[np.ndarray] | np.ndarray,
          sums: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(n, C) float32 embeddings as `embed_masks`, and with `sums` each mask's (n, C) float64 unnormalised
    coverage-weighted sum of cell features (what query.hierarchy merges), from the same forward pass."""
    image = check_image(image)
    masks = list(masks)
    for i, mask in enumerate(masks):
        if np.shape(mask) != image.shape[:2]:
            raise ValueError(f"mask {i} has shape {np.shape(mask)}, the image is {image.shape[:2]} (H, W)")
        if not np.any(mask):
            raise ValueError(f"mask {i} is empty; every region must cover at least one pixel")
    if not masks:
        return np.zeros((0, encoder.spec.visual_dim), np.float32), np.zeros((0, encoder.spec.visual_dim))
    resized, soft = prepare_image(image, [np.asarray(m, dtype=bool) for m in masks], encoder.spec)
    features = encoder.encode_dense(np.stack([resized]))  # what encode_batch does for one image
    with torch.inference_mode():
        visual, _ = pool_segments(features, torch.as_tensor(soft), torch.zeros(len(masks), dtype=torch.int64))
        cells = features[0].double().reshape(features.shape[1], -1).cpu().numpy()  # (C, g·g)
    return visual.astype(np.float32), (soft.reshape(len(masks), -1).astype(np.float64) @ cells.T if sums else None)


def working_image(image: np.ndarray, side: int) -> np.ndarray:
    """The (H, W, 3) uint8 image reduced by area averaging so that its long side is at most `side` pixels (the
    aspect ratio kept, each side ≥ 1); the image itself when it is no larger."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def image_regions(encoder: Encoder, image: np.ndarray, config: RegionConfig = RegionConfig()) -> Regions:
    """Regions of an (H, W, 3) uint8 image with their embeddings (one encoder call), made on its working-size
    copy (RegionConfig.working_side); `size` records (H, W) so results come back at the image's size."""
    height, width = check_image(image).shape[:2]
    work = working_image(image, max(config.working_side, encoder.spec.image_size))
    labels = region_labels(work, config, encoder.spec.grid)
    masks = masks_from_labels(labels)
    embeddings, sums = _pool(encoder, work, masks, sums=bool(config.merge_thresholds))
    levels = tuple(merge_levels(sums, adjacent_pairs(labels), config.merge_thresholds)) if sums is not None else ()
    return Regions(masks=masks, embeddings=embeddings, labels=labels,
                   size=(height, width) if work is not image else None, levels=levels,
                   image=work if config.refine is not None else None)


def split_regions(regions: Regions, pixel_labels: np.ndarray) -> tuple[Regions, np.ndarray, np.ndarray]:
    """Regions cut into pieces of one value of an (h, w) non-negative int map at the masks' size (a refined
    label per pixel): the pieces (each keeps its region's embedding and hierarchy groups), and per piece (m,)
    int64 its region and its value; pieces are numbered by (region, value)."""
    labels = regions.label_map()
    if np.shape(pixel_labels) != labels.shape:
        raise ValueError(f"pixel labels {np.shape(pixel_labels)} must be at the regions' size {labels.shape}")
    base = int(pixel_labels.max(initial=0)) + 1
    keys, pieces = np.unique(labels.astype(np.int64) * base + pixel_labels, return_inverse=True)
    source, value = keys // base, keys % base
    pieces = pieces.reshape(labels.shape)
    levels = tuple(RegionLevel(group=level.group[source], embeddings=level.embeddings) for level in regions.levels)
    return (Regions(masks=masks_from_labels(pieces), embeddings=regions.embeddings[source], labels=pieces,
                    size=regions.size, levels=levels, image=regions.image), source, value)


# ----------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True, eq=False)
class Reference:
    """A reference prompt: an (H, W, 3) uint8 image and exactly one of mask ((H, W) bool), box (XYXY pixels) or
    scribble ((x, y) points, a polyline); references sharing a label form one class."""

    image: np.ndarray
    mask: np.ndarray | None = None
    box: Box | None = None
    scribble: Sequence[Point] | None = None
    label: str = "target"


def prompt_mask(shape: tuple[int, int], mask: np.ndarray | None = None, box: Box | None = None,
                scribble: Sequence[Point] | None = None, scribble_width: int | None = None) -> np.ndarray:
    """The (H, W) bool region of a reference prompt; exactly one of:

    mask: (H, W) bool / 0-1 array, non-empty; box: XYXY pixels (max exclusive, floats rounded), inside the
    image; scribble: polyline of (x, y) pixel points inside the image, drawn `scribble_width` px wide
    (default max(3, min(H, W) // 32)); one point is a dot of that width.
    """
    height, width = shape
    given = [name for name, v in (("mask", mask), ("box", box), ("scribble", scribble)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"a reference needs exactly one of mask, box or scribble; got {given or 'none'}")
    if mask is not None:
        return _check_mask(mask, shape)
    if box is not None:
        return _box_mask(box, shape)
    points = _check_points(scribble, shape)
    line = scribble_width if scribble_width is not None else max(3, min(height, width) // 32)
    if line < 1:
        raise ValueError(f"scribble_width must be ≥ 1 pixel, got {line}")
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if len(points) > 1:
        draw.line(points, fill=255, width=line, joint="curve")
    for x, y in points:  # round caps and single points
        draw.ellipse((x - line / 2, y - line / 2, x + line / 2, y + line / 2), fill=255)
    return np.asarray(canvas) > 0


def _check_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    array = np.asarray(mask)
    if array.shape != tuple(shape):
        raise ValueError(f"reference mask has shape {array.shape}, its image is {tuple(shape)} (H, W); "
                         "give a mask at the reference image's resolution")
    array = array.astype(bool)
    if not array.any():
        raise ValueError("reference mask is empty; mark at least one pixel of the reference object")
    return array


def _box_mask(box: Box, shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    try:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be 4 numbers XYXY (x0, y0, x1, y1) in pixels, got {box!r}") from None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {tuple(box)} (XYXY pixels, max exclusive) is not a non-empty box inside the "
                         f"{width}x{height} (W x H) image; clip it to 0 ≤ x0 < x1 ≤ {width}, "
                         f"0 ≤ y0 < y1 ≤ {height}")
    out = np.zeros(shape, dtype=bool)
    out[y0:y1, x0:x1] = True
    return out


def _check_points(points: Sequence[Point], shape: tuple[int, int]) -> list[tuple[float, float]]:
    height, width = shape
    try:
        array = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else np.zeros((0, 2))
    except (TypeError, ValueError):
        raise ValueError("scribble must be a list of (x, y) pixel points") from None
    if not len(array) or not np.isfinite(array).all():
        raise ValueError("scribble must be a non-empty list of finite (x, y) pixel points")
    outside = (array[:, 0] < 0) | (array[:, 0] > width) | (array[:, 1] < 0) | (array[:, 1] > height)
    if outside.any():
        raise ValueError(f"scribble point {tuple(array[np.argmax(outside)])} lies outside the {width}x{height} "
                         "(W x H) image; points are (x, y) pixels")
    return [(float(x), float(y)) for x, y in array]


# ----------------------------------------------------------------------------------------- presets

# Named region configurations (`refbank eval --ablate regions=...`): the service's default superpixels, the
# encoder's patch grid, and a hierarchy over finer superpixels (Felzenszwalb scale 50, min size 20: boundaries
# of small objects kept) merged at four cosine levels; chosen on held-out images of a generated corpus of seed 21
# and 22 (docs/QUALITY.md, "Evaluation"); and `refined`, that hierarchy with its labels refined per pixel over the
# image's colours (query.pamr; 5 iterations scored as 10 at half the cost), chosen on seed 73 (docs/QUALITY.md,
# "Refined regions").
_HIERARCHY = RegionConfig(segments=SegmentConfig(superpixel_scale=50.0, superpixel_min_size=20),
                          merge_thresholds=(0.8, 0.6, 0.4, 0.2))
REGION_PRESETS: dict[str, RegionConfig] = {
    "superpixel": RegionConfig(),
    "grid": RegionConfig(kind="grid"),
    "hierarchy": _HIERARCHY,
    "refined": replace(_HIERARCHY, refine=RefineConfig(iterations=5)),
}


def region_preset(name: str, working_side: int = RegionConfig.working_side) -> RegionConfig:
    """The named region configuration (REGION_PRESETS) at `working_side`; ValueError listing the names."""
    if name not in REGION_PRESETS:
        raise ValueError(f"unknown regions {name!r}; use one of: {', '.join(REGION_PRESETS)}")
    return replace(REGION_PRESETS[name], working_side=working_side)
