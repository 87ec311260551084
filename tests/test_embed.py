"""Mask pooling and label embedding, checked against brute force on seeded synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bank_builder.config import EncoderConfig
from bank_builder.embed import TEXT_TEMPLATE, embed_labels, encode_batch, pool_segments, prepare_image
from bank_builder.encoders import Encoder, EncoderSpec, load_encoder


def make_spec(image_size: int = 96, patch_size: int = 8, text_dim: int | None = 4) -> EncoderSpec:
    return EncoderSpec(name="test", family="test", architecture="test", weights="untrained", untrained=True,
                       seed=0, image_size=image_size, patch_size=patch_size, visual_dim=4, text_dim=text_dim,
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class CountingEncoder(Encoder):
    """A real Encoder whose text features are fixed random vectors per text; it records every call."""

    def __init__(self, text_dim: int | None = 4):
        self.spec, self.device, self.calls = make_spec(text_dim=text_dim), torch.device("cpu"), []

    def encode_dense(self, images: np.ndarray) -> torch.Tensor:
        return torch.ones(len(images), 4, self.spec.grid, self.spec.grid)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.stack([np.random.default_rng(sum(t.encode())).normal(size=4) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def brute_force_pool(features: np.ndarray, soft: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-segment loop in float64: weighted mean of cells, normalised; weighted mean cosine of cells to it."""
    visual, quality = [], []
    for mask, b in zip(soft, index):
        cells = features[b].reshape(features.shape[1], -1).T.astype(np.float64)  # (P, C)
        w = mask.reshape(-1) / mask.sum()
        v = (w[:, None] * cells).sum(0)
        v /= np.linalg.norm(v)
        cos = cells @ v / np.linalg.norm(cells, axis=1)
        visual.append(v)
        quality.append((w * cos).sum())
    return np.array(visual), np.array(quality)


def test_pool_matches_brute_force():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 16, 5, 5)).astype(np.float32)
    soft = rng.uniform(size=(9, 5, 5)).astype(np.float32) * (rng.uniform(size=(9, 5, 5)) > 0.5)
    index = rng.integers(0, 3, size=9)
    visual, quality = pool_segments(torch.from_numpy(features), torch.from_numpy(soft), torch.from_numpy(index))
    want_visual, want_quality = brute_force_pool(features, soft, index)
    assert visual.dtype == np.float16 and visual.shape == (9, 16)
    assert quality.dtype == np.float32 and quality.shape == (9,)
    np.testing.assert_allclose(visual, want_visual, atol=2e-3)
    np.testing.assert_allclose(quality, want_quality, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(visual.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_single_cell_mask_pools_to_that_cell():
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.normal(size=(2, 8, 4, 4)).astype(np.float32))
    soft = torch.zeros(1, 4, 4)
    soft[0, 2, 3] = 0.3  # the fraction does not matter when only one cell is covered
    visual, quality = pool_segments(features, soft, torch.tensor([1]))
    cell = features[1, :, 2, 3].numpy()
    np.testing.assert_allclose(visual[0], cell / np.linalg.norm(cell), atol=1e-3)
    assert quality[0] == pytest.approx(1.0, abs=1e-6)


def test_pool_rejects_empty_mask_and_bad_index():
    features = torch.ones(2, 3, 4, 4)
    with pytest.raises(ValueError, match="covers no feature cell"):
        pool_segments(features, torch.zeros(1, 4, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="image_index"):
        pool_segments(features, torch.ones(1, 4, 4), torch.tensor([2]))


@pytest.mark.parametrize("shape", [(50, 37), (101, 203), (96, 96), (7, 13)])
def test_soft_masks_are_exact_cell_coverage(shape):
    h, w = shape
    spec = make_spec()  # grid 12: every shape above but 96×96 has a non-integer scale factor
    g = spec.grid
    rng = np.random.default_rng(h * w)
    masks = [rng.uniform(size=shape) > 0.6, np.ones(shape, bool), np.zeros(shape, bool)]
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    resized, soft = prepare_image(image, masks, spec)
    assert resized.shape == (96, 96, 3) and resized.dtype == np.uint8
    assert soft.shape == (3, g, g) and soft.dtype == np.float32
    # ground truth: upsample by g (each pixel → g×g sub-pixels), then cell (i, j) is exactly the
    # h×w block of sub-pixels at (i*h, j*w), whose mean is the covered fraction
    for mask, got in zip(masks, soft):
        fine = np.repeat(np.repeat(mask, g, axis=0), g, axis=1).astype(np.float64)
        want = fine.reshape(g, h, g, w).mean(axis=(1, 3))
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert got.sum() * (h / g) * (w / g) == pytest.approx(mask.sum(), rel=1e-5, abs=1e-4)
    np.testing.assert_allclose(soft[1], 1.0, atol=1e-6)


def test_prepare_image_rejects_misaligned_mask():
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match="mask 0"):
        prepare_image(image, [np.ones((30, 20), bool)], make_spec())


def test_embed_labels_encodes_each_label_once():
    encoder, cache = CountingEncoder(), {}
    first = embed_labels(encoder, ["cat", None, "dog", "cat"], cache)
    assert encoder.calls == [[TEXT_TEMPLATE.format("cat")], [TEXT_TEMPLATE.format("dog")]]
    assert first[1] is None and first[0] is first[3]
    for vector in (first[0], first[2]):
        assert vector.dtype == np.float16 and vector.shape == (4,)
        assert np.linalg.norm(vector.astype(np.float32)) == pytest.approx(1.0, abs=2e-3)
    second = embed_labels(encoder, ["dog", None, "cat"], cache)
    assert len(encoder.calls) == 2 and second[0] is first[2]
    embed_labels(encoder, ["bird", "cat"], cache)
    assert encoder.calls[2:] == [[TEXT_TEMPLATE.format("bird")]]


def test_label_vectors_do_not_depend_on_cache_history():
    # A resumed build's actors see labels in another order than a clean build's; vectors must match bit for bit.
    encoder = load_encoder(EncoderConfig(name="tiny-clip", weights="untrained", seed=0, device="cpu"))
    many = embed_labels(encoder, ["grass", "rocket", "a cat", "moon", "coins"], {})
    alone = embed_labels(encoder, ["moon"], {})
    assert many[3].tobytes() == alone[0].tobytes()


def test_embed_labels_without_text_tower():
    encoder = CountingEncoder(text_dim=None)
    assert embed_labels(encoder, ["cat", None], {}) == [None, None]
    assert encoder.calls == []


def test_encode_batch_with_tiny_clip():
    encoder = load_encoder(EncoderConfig(name="tiny-clip", weights="untrained", seed=0, device="cpu"))
    rng = np.random.default_rng(2)
    images, soft, index, labels = [], [], [], []
    for b, shape in enumerate([(80, 120), (150, 90)]):
        whole, half = np.ones(shape, bool), np.zeros(shape, bool)
        half[: shape[0] // 2] = True
        resized, s = prepare_image(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), [whole, half], encoder.spec)
        images.append(resized)
        soft.append(s)
        index += [b, b]
        labels += ["cat", None]
    images, soft, index = np.stack(images), np.concatenate(soft), np.array(index)
    out = encode_batch(encoder, images, soft, index, labels, {})
    assert out.visual.shape == (4, 64) and out.visual.dtype == np.float16
    assert out.quality.shape == (4,) and np.all(out.quality <= 1.0 + 1e-5)
    assert out.text[1] is None and out.text[0] is out.text[2] and out.text[0].shape == (64,)
    # a mask over the whole image pools to the normalised mean of its dense features
    mean = encoder.encode_dense(images).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(out.visual[[0, 2]], mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=2e-3)
    empty = encode_batch(encoder, images, soft[:0], index[:0], [], {})
    assert empty.visual.shape == (0, 64) and empty.text == []
