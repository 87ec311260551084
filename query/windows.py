"""The test-time protocol of the segmentation benchmarks (mmsegmentation's test pipeline), on the query side: the
image resized so that its short side is S, cut into crop × crop windows at a stride (mmseg `slide_inference`:
windows on a regular grid, the last row and column shifted back inside the image), each window cut into regions
and scored on its own, per-pixel class scores averaged where windows overlap. A window as large as the image is
the whole-image run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from query.regions import Regions, check_image
from query.render import upsample_nearest

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 pixels, max exclusive


@dataclass(frozen=True)
class WindowConfig:
    """short_side: resize the image (bilinear, aspect kept) so that its short side is this many pixels (None = as
    it is); crop: window side in pixels (None = the whole image); stride: step between windows (None = crop,
    i.e. windows that touch without overlap; mmseg's ADE20K configs use crop 512, stride 341)."""

    short_side: int | None = None
    crop: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        for name in ("short_side", "crop", "stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1 pixel (or None), got {value}")
        if self.stride is not None and self.crop is None:
            raise ValueError("stride needs crop: give the window side too (e.g. crop 512, stride 341)")


def resize_short_side(image: np.ndarray, side: int | None) -> np.ndarray:
    """The (H, W, 3) uint8 image resized bilinearly so that min(H, W) = side (aspect kept, each side ≥ 1); the
    image itself when side is None or already its short side."""
    image = check_image(image)
    height, width = image.shape[:2]
    if side is None or min(height, width) == side:
        return image
    scale = side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def window_boxes(height: int, width: int, crop: int | None, stride: int | None) -> list[Box]:
    """The windows covering an H × W image, row by row: mmseg's grid of ⌈(side − crop) / stride⌉ + 1 windows per
    axis, a window past the edge shifted back to end at it; one box (0, 0, H, W) when crop is None or ≥ both sides."""
    if crop is None:
        return [(0, 0, height, width)]
    stride = stride or crop
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y1 - crop, 0), max(x1 - crop, 0), y1, x1))
    return boxes


def window_regions(image: np.ndarray, regions: Callable[[np.ndarray], Regions],
                   config: WindowConfig) -> list[tuple[Box, Regions]]:
    """Each window of the (already resized) image with its regions (`regions(window pixels)`, e.g.
    Segmenter.regions), computed once so that several scorers can share them."""
    height, width = check_image(image).shape[:2]
    return [(box, regions(np.ascontiguousarray(image[box[0]:box[2], box[1]:box[3]])))
            for box in window_boxes(height, width, config.crop, config.stride)]


def pixel_scores(regions: Regions, scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, ...) float32: each pixel takes its region's row of `scores` ((n, ...) per region), the region map
    upsampled nearest to size (H, W) exactly as query.render.assemble_result draws label maps."""
    return np.asarray(scores, dtype=np.float32)[upsample_nearest(regions.label_map(), size)]


def dense_scores(windows: list[tuple[Box, Regions]], size: tuple[int, int],
                 score: Callable[[Box, Regions], np.ndarray],
                 paint: Callable[[Regions, np.ndarray, tuple[int, int]], np.ndarray] = pixel_scores) -> np.ndarray:
    """(H, W, K) float32 per-pixel scores of the image of `size` (H, W): each window's `score(box, regions)` ((n, K)
    per region) painted onto its pixels (`paint(regions, scores, window size)`, e.g. Segmenter.paint, which
    refines), averaged over the windows that cover a pixel."""
    total: np.ndarray | None = None
    count = np.zeros(size, np.float32)
    for box, regions in windows:
        y0, x0, y1, x1 = box
        painted = paint(regions, score(box, regions), (y1 - y0, x1 - x0))
        if total is None:
            total = np.zeros((*size, painted.shape[2]), np.float32)
        total[y0:y1, x0:x1] += painted
        count[y0:y1, x0:x1] += 1
    if total is None or not count.all():
        raise ValueError(f"windows must cover the whole {size} image")
    return total / count[:, :, None]
