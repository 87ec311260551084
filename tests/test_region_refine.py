"""PAMR refinement (query.pamr) and the region split behind the `refined` region preset."""

from __future__ import annotations

import numpy as np
import pytest

from query.pamr import RefineConfig, colour_affinity, refine_maps, softmax
from query.regions import Regions, split_regions


def _two_colour_image(size: int = 32, edge: int = 20) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[:, :edge] = (200, 40, 40)
    image[:, edge:] = (30, 60, 210)
    return image


def test_pamr_keeps_a_constant_map_constant():
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    maps = np.broadcast_to(np.array([0.2, 0.7, 0.1], np.float32), (24, 24, 3))
    np.testing.assert_allclose(refine_maps(maps, image), maps, atol=1e-5)  # float32 weights
    weights = colour_affinity(image)
    assert weights.shape == (48, 24, 24)
    np.testing.assert_allclose(weights.sum(axis=0), 1, atol=1e-5)


def test_pamr_moves_a_boundary_to_the_colour_edge():
    image = _two_colour_image(edge=20)
    maps = np.zeros((32, 32, 2), np.float32)
    maps[:, :14, 0] = 1  # the regions' boundary at column 14, the colour edge at 20
    maps[:, 14:, 1] = 1
    labels = refine_maps(softmax(maps, 0.5), image, RefineConfig(iterations=20)).argmax(axis=2)
    assert (labels[:, :20] == 0).mean() > 0.95  # the red side took class 0 up to the edge
    assert (labels[:, 21:] == 1).all()  # and it stopped there


def _pamr_by_the_formula(maps: np.ndarray, image: np.ndarray, config: RefineConfig) -> np.ndarray:
    """PAMR written out pixel by pixel: neighbours past the border are the nearest edge pixel."""
    h, w = image.shape[:2]
    pixels = image.astype(np.float64) / 255
    ring = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    offsets = [(dy * d, dx * d) for d in config.dilations for dy, dx in ring]
    alpha = np.zeros((h, w, len(offsets)))
    for y in range(h):
        for x in range(w):
            near = [pixels[min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)] for dy, dx in offsets]
            window = np.array(near + [pixels[y, x]] * len(config.dilations))  # each dilated 3×3 holds the centre
            sigma = window.std(axis=0)
            logits = np.array([-(np.abs(n - pixels[y, x]) / (1e-8 + config.affinity_scale * sigma)).mean()
                               for n in near])
            alpha[y, x] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    out = maps.astype(np.float64)
    for _ in range(config.iterations):
        out = np.stack([[sum(alpha[y, x, j] * out[min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)]
                             for j, (dy, dx) in enumerate(offsets)) for x in range(w)] for y in range(h)])
    return out


def test_pamr_computes_the_published_update():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    maps = rng.random((9, 11, 3)).astype(np.float32)
    config = RefineConfig(iterations=3, dilations=(1, 2, 12))  # 12: past the border everywhere
    np.testing.assert_allclose(refine_maps(maps, image, config), _pamr_by_the_formula(maps, image, config),
                               rtol=1e-4, atol=1e-5)


def test_split_regions_cuts_regions_into_pieces_of_one_label():
    labels = np.zeros((4, 6), np.int64)
    labels[:, 3:] = 1
    regions = Regions(masks=labels[None] == np.arange(2)[:, None, None], embeddings=np.eye(2, 4, dtype=np.float32),
                      labels=labels)
    pixel = np.zeros((4, 6), np.int64)
    pixel[:2, :] = 2
    pieces, source, value = split_regions(regions, pixel)
    assert len(pieces) == 4 and source.tolist() == [0, 0, 1, 1] and value.tolist() == [0, 2, 0, 2]
    np.testing.assert_array_equal(pieces.embeddings, regions.embeddings[source])
    np.testing.assert_array_equal(value[pieces.labels], pixel)
    np.testing.assert_array_equal(source[pieces.labels], labels)
