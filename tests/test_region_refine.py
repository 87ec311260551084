"""Unmixed region pooling (query.unmixing), PAMR refinement (query.pamr), and the `refined` region preset through
the Segmenter against the evaluator's scoring."""

from __future__ import annotations

import numpy as np
import pytest

from query.pamr import RefineConfig, colour_affinity, refine_maps, softmax
from query.regions import Regions, split_regions
from query.unmixing import unmix_embeddings


def _mixed_cells(seed: int = 0, regions: int = 5, cells: int = 36, dim: int = 8):
    """Known region embeddings, a coverage whose cells each sum to 1, and the cells as exact mixes."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(regions, dim))
    coverage = rng.random((regions, cells)) ** 3  # mostly one dominant region per cell
    coverage /= coverage.sum(axis=0, keepdims=True)
    return truth, coverage, coverage.T @ truth


def test_unmixing_recovers_known_embeddings_of_mixed_cells():
    truth, coverage, cells = _mixed_cells()
    unit = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    # the cells are exact mixes and the coverage has full row rank, so with a vanishing ridge the solution is the truth
    solved = unmix_embeddings(coverage, cells, 1e-9)
    np.testing.assert_allclose(solved, unit, atol=1e-5)
    # brute force: the objective at the solution is below every perturbed point's
    lam = 3.0
    e = unmix_embeddings(coverage, cells, lam).astype(np.float64)
    area = coverage.sum(axis=1)
    plain = coverage @ cells / area[:, None]

    def objective(x: np.ndarray) -> float:
        return float(((coverage.T @ x - cells) ** 2).sum() + lam * (area[:, None] * (x - plain) ** 2).sum())

    gram = coverage @ coverage.T + lam * np.diag(area)
    raw = np.linalg.solve(gram, (1 + lam) * coverage @ cells)  # the unnormalised solution
    np.testing.assert_allclose(e, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    rng = np.random.default_rng(1)
    assert all(objective(raw) < objective(raw + 1e-3 * rng.normal(size=raw.shape)) for _ in range(50))


def test_unmixing_with_infinite_ridge_is_plain_pooling():
    _, coverage, cells = _mixed_cells(seed=2)
    plain = coverage @ cells
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    np.testing.assert_allclose(unmix_embeddings(coverage, cells, 1e9), plain, atol=1e-6)
    with pytest.raises(ValueError, match="> 0"):
        unmix_embeddings(coverage, cells, 0.0)


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
