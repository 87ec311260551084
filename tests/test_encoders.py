"""Encoder registry, weights policy and dense/text features; forward passes use the tiny architectures only."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bank_builder.config import EncoderConfig
from bank_builder.encoders import (
    EncoderWeightsError,
    add_encoder_config,
    get_encoder_entry,
    list_encoders,
    load_encoder,
    resolve_spec,
)
from bank_builder.encoders.registry import pixels_to_tensor


def config(name: str, weights: str = "untrained", seed: int = 0) -> EncoderConfig:
    return EncoderConfig(name=name, weights=weights, seed=seed, device="auto")


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_registry_lists_entries_and_rejects_unknown_names():
    assert set(list_encoders()) >= {"clip-vit-b16", "clip-vit-b32", "dinov2-vits14", "tiny-clip", "tiny-dino"}
    assert "refbank-tiny-clip" not in list_encoders()  # an open_clip model config, not an entry
    with pytest.raises(ValueError, match="tiny-clip"):
        get_encoder_entry("no-such-encoder")


@pytest.mark.parametrize("name, grid, visual_dim, text_dim", [
    ("clip-vit-b16", 14, 512, 512), ("clip-vit-b32", 7, 512, 512), ("dinov2-vits14", 16, 384, None),
    ("tiny-clip", 12, 64, 64), ("tiny-dino", 8, 64, None)])
def test_builtin_entries_are_consistent_with_their_libraries(name, grid, visual_dim, text_dim):
    # registering a copy runs the library checks: the tag exists, QuickGELU and mean/std match it
    assert add_encoder_config({**get_encoder_entry(name), "name": f"test-copy-{name}"}) == f"test-copy-{name}"
    spec = resolve_spec(config(name))
    assert (spec.grid, spec.visual_dim, spec.text_dim) == (grid, visual_dim, text_dim)


def test_quickgelu_mismatch_is_rejected():
    entry = {**get_encoder_entry("clip-vit-b16"), "name": "test-b16-gelu", "architecture": "ViT-B-16"}
    with pytest.raises(ValueError, match="quick_gelu"):
        add_encoder_config(entry)


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-dino"])
def test_resolve_spec_matches_loaded_encoder(name):
    cfg = config(name, seed=5)
    encoder = load_encoder(cfg)
    assert encoder.spec == resolve_spec(cfg)
    assert encoder.spec.untrained and encoder.spec.seed == 5 and encoder.spec.weights == "untrained"
    assert encoder.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert not encoder.model.training


def test_tiny_clip_dense_and_text_features():
    encoder = load_encoder(config("tiny-clip"))
    dense = encoder.encode_dense(random_images(3, 96))
    assert dense.shape == (3, 64, 12, 12) and dense.dtype == torch.float32
    pooled = dense.mean(dim=(2, 3))
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-4)  # different images, different features
    text = encoder.encode_text(["a photo of a cat.", "a photo of a dog.", "a photo of a cat."])
    assert text.shape == (3, 64) and text.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(text[0], text[1]) and np.allclose(text[0], text[2])
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode_dense(random_images(1, 112))


def test_tiny_clip_dense_features_follow_the_clip_image_path():
    # CLIP's image embedding is ln_post(class token) @ proj; dense features must be the patch tokens of the
    # same pass, ln_post'ed and projected the same way, laid out row-major on the grid
    encoder = load_encoder(config("tiny-clip"))
    visual, images = encoder.model.visual, random_images(2, 96)
    x = pixels_to_tensor(images, encoder.spec, encoder.device)
    with torch.inference_mode():
        tokens = visual.ln_post(visual.transformer(visual._embeds(x))) @ visual.proj  # (B, 1 + g*g, D)
        torch.testing.assert_close(tokens[:, 0], encoder.model.encode_image(x))
        want = tokens[:, 1:].reshape(2, 12, 12, 64).permute(0, 3, 1, 2)
    torch.testing.assert_close(encoder.encode_dense(images), want)


def test_tiny_dino_dense_and_no_text_tower():
    encoder = load_encoder(config("tiny-dino"))
    dense = encoder.encode_dense(random_images(2, 112))
    assert dense.shape == (2, 64, 8, 8) and dense.dtype == torch.float32
    with pytest.raises(ValueError, match="no text tower"):
        encoder.encode_text(["a cat"])


@pytest.mark.parametrize("name, size", [("tiny-clip", 96), ("tiny-dino", 112)])
def test_same_seed_same_outputs_and_global_rng_untouched(name, size):
    images = random_images(2, size)
    rng_before = torch.get_rng_state()
    first = load_encoder(config(name, seed=7)).encode_dense(images)
    assert torch.equal(torch.get_rng_state(), rng_before)
    second = load_encoder(config(name, seed=7)).encode_dense(images)
    other = load_encoder(config(name, seed=8)).encode_dense(images)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


WEIGHTS_DIGEST = """
import hashlib, sys
from bank_builder.config import EncoderConfig
from bank_builder.encoders import load_encoder
model = load_encoder(EncoderConfig(name=sys.argv[1], weights="untrained", seed=11, device="cpu")).model
digest = hashlib.sha256()
for key, value in sorted(model.state_dict().items()):
    digest.update(key.encode() + value.cpu().numpy().tobytes())
print(digest.hexdigest())
"""


def test_seeded_weights_are_identical_in_a_fresh_process():
    # this process has already drawn random numbers and built other models; a fresh one has not
    torch.rand(3)
    digest = hashlib.sha256()
    for key, value in sorted(load_encoder(config("tiny-clip", seed=11)).model.state_dict().items()):
        digest.update(key.encode() + value.cpu().numpy().tobytes())
    fresh = subprocess.run([sys.executable, "-c", WEIGHTS_DIGEST, "tiny-clip"], capture_output=True, text=True,
                           check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert fresh.stdout.strip() == digest.hexdigest()


def test_untrained_weights_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="bank_builder.encoders.registry"):
        load_encoder(config("tiny-dino"))
    assert any("UNTRAINED" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("name", ["tiny-clip", "clip-vit-b16", "dinov2-vits14"])
def test_pretrained_that_cannot_load_fails_fast_and_says_how_to_proceed(name):
    start = time.monotonic()
    with pytest.raises(EncoderWeightsError, match="weights='untrained'"):
        load_encoder(config(name, weights="pretrained"))
    assert time.monotonic() - start < 10


def test_missing_checkpoint_names_the_path(tmp_path):
    path = str(tmp_path / "missing.pt")
    with pytest.raises(EncoderWeightsError, match="missing.pt"):
        load_encoder(config("tiny-clip", weights=path))


@pytest.mark.parametrize("name, size", [("tiny-clip", 96), ("tiny-dino", 112)])
def test_local_checkpoint_round_trip(tmp_path, name, size):
    seeded = load_encoder(config(name, seed=3))
    path = str(tmp_path / "weights.pt")
    torch.save(seeded.model.state_dict(), path)
    loaded = load_encoder(config(name, weights=path))
    assert (loaded.spec.weights, loaded.spec.untrained, loaded.spec.seed) == (path, False, None)
    images = random_images(2, size)
    torch.testing.assert_close(loaded.encode_dense(images), seeded.encode_dense(images))


def test_checkpoint_of_another_architecture_is_a_weights_error(tmp_path):
    path = str(tmp_path / "dino.pt")
    torch.save(load_encoder(config("tiny-dino")).model.state_dict(), path)
    with pytest.raises(EncoderWeightsError, match="dino.pt"):
        load_encoder(config("tiny-clip", weights=path))


def test_add_encoder_config_from_file_and_dims_check(tmp_path):
    entry = {**get_encoder_entry("tiny-dino"), "name": "test-dino-96", "image_size": 98,
             "model_kwargs": {"img_size": 98, "depth": 1, "embed_dim": 32, "num_heads": 2}, "visual_dim": 32}
    path = tmp_path / "test-dino-96.json"
    path.write_text(json.dumps(entry))
    assert add_encoder_config(path) == "test-dino-96"
    assert add_encoder_config(entry) == "test-dino-96"  # the same content again is fine
    assert "test-dino-96" in list_encoders()
    assert load_encoder(config("test-dino-96")).encode_dense(random_images(1, 98)).shape == (1, 32, 7, 7)
    with pytest.raises(ValueError, match="different configuration"):
        add_encoder_config({**entry, "visual_dim": 16})
    add_encoder_config({**entry, "name": "test-dino-wrong-dim", "visual_dim": 16})
    with pytest.raises(ValueError, match="visual_dim"):
        load_encoder(config("test-dino-wrong-dim"))
    with pytest.raises(ValueError, match="missing fields"):
        add_encoder_config({"name": "test-incomplete", "family": "timm"})
