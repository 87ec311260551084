"""Renderers on hand-made label maps: colours fixed per label, outlines, overlays, legends (no bank needed)."""

from __future__ import annotations

import io
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from skimage.color import deltaE_ciede2000, rgb2lab

from bank_builder.synthetic import class_names
from query.regions import masks_from_labels
from query.render import (
    LEGEND_KEY,
    SegmentationResult,
    assemble_result,
    class_colours,
    hex_colour,
    label_colour,
    legend,
    legend_png,
    outline,
    overlay,
    overlay_png,
    region_rles,
    upsample_nearest,
)


def result_of(label_map: np.ndarray, classes: list[str]) -> SegmentationResult:
    return SegmentationResult(mode="vocabulary", classes=classes, label_map=label_map.astype(np.uint16),
                              score_map=np.zeros(label_map.shape, np.float32), regions=[], encoder="none",
                              untrained=True)


def test_a_label_has_one_colour_whatever_its_position():
    assert class_colours(["cat", "moon"])[1].tolist() == class_colours(["moon", "grass", "cat"])[3].tolist()
    assert label_colour("cat") == label_colour("cat") != label_colour("Cat")
    assert label_colour(None) == (0, 0, 0) and class_colours([])[0].tolist() == [0, 0, 0]
    r, g, b = label_colour("cat")
    assert hex_colour("cat") == f"#{r:02x}{g:02x}{b:02x}"
    colours = np.array([label_colour(name) for name in class_names()]) / 255
    assert (colours.max(axis=1) >= 0.6 - 1e-9).all()  # value >= 0.6: no near-black tints
    lab = rgb2lab(colours[None])[0]
    closest = min(deltaE_ciede2000(lab[i], lab[j]) for i, j in itertools.combinations(range(len(lab)), 2))
    assert closest >= 12, closest  # the synthetic corpus's classes are told apart (the salt's reason)


def test_outline_is_the_inner_edge_of_each_label():
    labels = np.zeros((8, 8), np.uint16)
    labels[2:6, 1:5] = 1  # a 4 × 4 square: its 12 border pixels are edge, the 2 × 2 inside is not
    labels[2:6, 5:7] = 2  # touching label 2: both sides of the shared border are edge
    edge = outline(labels)
    assert edge[2:6, 1:5].sum() == 12 and not edge[3:5, 2:4].any()
    assert edge[2:6, 4].all() and edge[2:6, 5].all() and edge[2:6, 5:7].all()
    assert not edge[labels == 0].any()
    assert not outline(np.ones((4, 4), np.uint16)).any()  # one label everywhere: nothing to outline


def test_overlay_blends_outlines_and_keeps_background():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    labels = np.zeros((8, 8), np.uint16)
    labels[2:6, 1:5] = 1
    labels[2:6, 5:7] = 2
    classes = ["moon", "cat"]
    colours = class_colours(classes)
    edge, inside = outline(labels), (labels > 0) & ~outline(labels)
    for alpha in (0.0, 0.3, 1.0):
        out = overlay(image, labels, classes, alpha=alpha)
        np.testing.assert_array_equal(out[labels == 0], image[labels == 0])
        np.testing.assert_array_equal(out[edge], colours[labels[edge]])  # outlines at full colour
        want = np.rint((1 - alpha) * image.astype(np.float32) + alpha * colours[labels].astype(np.float32))
        np.testing.assert_array_equal(out[inside], want[inside].astype(np.uint8))
    plain = overlay(image, labels, classes, alpha=0.0, outlines=False)
    np.testing.assert_array_equal(plain, image)
    decoded = np.asarray(Image.open(io.BytesIO(overlay_png(image, result_of(labels, classes), alpha=0.3))))
    np.testing.assert_array_equal(decoded, overlay(image, labels, classes, alpha=0.3))
    with pytest.raises(ValueError, match="no class"):
        overlay(image, labels, ["moon"])
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, labels, classes, alpha=1.5)


def test_legend_entries_and_the_legend_panel():
    labels = np.zeros((40, 60), np.uint16)
    labels[5:20, 5:30] = 1
    labels[25:35, 10:50] = 3
    classes = ["brick", "coffee", "motorcycle"]  # "coffee" (2) is requested but absent
    entries = legend(result_of(labels, classes))
    assert [(e["value"], e["label"], e["pixels"]) for e in entries] == [
        (0, None, 40 * 60 - 15 * 25 - 10 * 40), (1, "brick", 15 * 25), (2, "coffee", 0), (3, "motorcycle", 10 * 40)]
    assert [e["color"] for e in entries] == [hex_colour(e["label"]) for e in entries]
    picture = np.full((40, 60, 3), 200, np.uint8)
    png = legend_png(picture, entries)
    image = Image.open(io.BytesIO(png))
    stored = json.loads(image.text[LEGEND_KEY])
    assert stored == [{"label": "brick", "color": hex_colour("brick")},
                      {"label": "motorcycle", "color": hex_colour("motorcycle")}]  # only labels present
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] >= 40 + 2 * 12 and pixels.shape[1] >= 60
    np.testing.assert_array_equal(pixels[:40, :60], picture)  # the overlay itself, unchanged, on top
    panel = {tuple(p) for p in pixels[40:].reshape(-1, 3)}
    assert label_colour("brick") in panel and label_colour("motorcycle") in panel
    assert label_colour("coffee") not in panel


def test_region_rles_read_off_a_label_map_equal_pycocotools():
    """Runs read off a (working-size) region map, upsampled to the request's size, give pycocotools' own RLE,
    box and area of each region's mask, without an (n, H, W) mask stack."""
    rng = np.random.default_rng(3)
    for _ in range(60):
        n = int(rng.integers(1, 6))
        small = rng.integers(0, n + 1, tuple(rng.integers(1, 12, 2))).astype(np.int32)  # 0 = no region
        size = tuple(int(s * f) for s, f in zip(small.shape, rng.integers(1, 4, 2)))
        full = upsample_nearest(small, size)
        for i, (rle, bbox, area) in enumerate(region_rles(small, n, size)):
            expected = mask_utils.encode(np.asfortranarray((full == i + 1).astype(np.uint8)))
            x, y, w, h = mask_utils.toBbox(expected)
            assert rle == {"size": list(size), "counts": expected["counts"].decode()}
            assert bbox == (int(x), int(y), int(x + w), int(y + h)) and area == int((full == i + 1).sum())


def test_a_result_at_a_working_size_is_the_result_of_its_upsampled_masks():
    rng = np.random.default_rng(4)
    spec = SimpleNamespace(name="none", untrained=True)
    small = rng.integers(0, 7, (24, 40))
    size = (75, 130)  # not a multiple of the working size
    assigned, scores = rng.integers(0, 3, 7), rng.random(7).astype(np.float32)
    reduced = assemble_result("vocabulary", masks_from_labels(small), assigned, scores, ["a", "b"], spec,
                              labels=small, size=size)
    full = upsample_nearest(small, size)
    direct = assemble_result("vocabulary", masks_from_labels(full), assigned, scores, ["a", "b"], spec)
    assert reduced.label_map.shape == size and reduced.label_map.dtype == np.uint16
    np.testing.assert_array_equal(reduced.label_map, direct.label_map)
    np.testing.assert_array_equal(reduced.score_map, direct.score_map)
    assert reduced.to_dict() == direct.to_dict()
