"""Encoders that travel with the job: an entry pinned into the BuildConfig, an encoder defined only in a config
file built on Ray worker processes and served from the bank alone, and the errors of entries that cannot travel."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from bank_builder.format import read_manifest
from bank_builder.config import BuildConfig, EncoderConfig, PipelineConfig, SegmentConfig
from bank_builder.encoders import (
    add_encoder_config,
    encoder_config_from_file,
    get_encoder_entry,
    list_encoders,
    resolve_spec,
)
from bank_builder.encoders.registry import CONFIG_DIR
from bank_builder.index import IndexConfig, build_index
from bank_builder.pipeline import build_fingerprint, build_bank
from bank_builder.synthetic import CorpusConfig, make_corpus
from tests.build_helpers import read_bank

# An open_clip architecture no library and no registry knows: 64 px input, 16 px patches, 32-d joint space.
MODEL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
ENTRY = {
    "name": "file-only-clip", "family": "open_clip", "architecture": "refbank-test-file-only-clip", "pretrained": None,
    "image_size": 64, "patch_size": 16, "visual_dim": 32, "text_dim": 32,
    "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
    "model_config": "file-only-clip-model.json",
}


def write_entry(folder, entry: dict = ENTRY, model_config: dict = MODEL_CONFIG):
    """The entry and its model config as two files in `folder`; returns the entry's path."""
    (folder / entry["model_config"]).write_text(json.dumps(model_config))
    path = folder / f"{entry['name']}.json"
    path.write_text(json.dumps(entry))
    return path


def test_a_string_where_an_encoder_config_belongs_fails_at_once():
    with pytest.raises(TypeError, match=r"BuildConfig.encoder must be an EncoderConfig, got str 'tiny-clip'; "
                                        r"pass encoder=EncoderConfig\(name='tiny-clip'\)"):
        BuildConfig(source="x", bank="y", encoder="tiny-clip")
    with pytest.raises(TypeError, match="BuildConfig.pipeline must be a PipelineConfig, got dict"):
        BuildConfig(source="x", bank="y", pipeline={"batch_size": 4})
    with pytest.raises(ValueError, match="unknown encoder 'no-such'.*--encoder-config"):
        BuildConfig(source="x", bank="y", encoder=EncoderConfig(name="no-such"))


def test_the_build_config_carries_the_whole_registered_entry():
    """What add_encoder_config registers in this process is pinned into the job config that workers receive."""
    name = add_encoder_config({**get_encoder_entry("tiny-clip"), "name": "test-registered-clip"})
    config = BuildConfig(source="x", bank="y", encoder=EncoderConfig(name=name, weights="untrained"))
    assert config.encoder.entry == get_encoder_entry(name)
    # the open_clip model config travels as content, read from the file the built-in entry names
    assert config.encoder.entry["model_config"] == json.loads((CONFIG_DIR / "refbank-tiny-clip.json").read_text())
    assert replace(config, bank="z").encoder.entry == config.encoder.entry  # re-pinning is a no-op
    with pytest.raises(ValueError, match="carries the entry of 'test-registered-clip'"):
        replace(config.encoder, name="tiny-clip")


def test_an_entry_from_a_file_is_self_contained_and_registers_nothing(tmp_path):
    config = encoder_config_from_file(write_entry(tmp_path), weights="untrained", seed=3)
    assert (config.name, config.weights, config.seed) == ("file-only-clip", "untrained", 3)
    assert config.entry["model_config"] == MODEL_CONFIG and "file-only-clip" not in list_encoders()
    spec = resolve_spec(config)
    assert spec.entry == config.entry and spec.to_dict()["entry"] == config.entry and spec.grid == 4
    # the same content given by name or by file gives the same fingerprint (the spec hashes the entry)
    file_build = BuildConfig(source="x", bank="y", encoder=config)
    add_encoder_config(config.entry)
    named_build = BuildConfig(source="x", bank="y", encoder=EncoderConfig(name="file-only-clip", weights="untrained",
                                                                           seed=3))
    assert build_fingerprint(file_build, spec) == build_fingerprint(named_build, resolve_spec(named_build.encoder))


def test_entries_that_cannot_travel_or_disagree_are_refused(tmp_path):
    with pytest.raises(ValueError, match="other processes cannot read; load the entry with read_encoder_entry"):
        resolve_spec(EncoderConfig(name=ENTRY["name"], weights="untrained", entry=ENTRY))  # model_config: a path
    clash = {**ENTRY, "name": "test-clash", "architecture": "refbank-tiny-clip"}  # tiny-clip's architecture name
    with pytest.raises(ValueError, match="differs from the 'refbank-tiny-clip' open_clip already holds"):
        encoder_config_from_file(write_entry(tmp_path, clash))
    broken = {**ENTRY, "name": "test-broken", "architecture": "refbank-test-broken"}
    with pytest.raises(ValueError, match="model_config needs the keys"):
        encoder_config_from_file(write_entry(tmp_path, broken, {"embed_dim": 32}))
    with pytest.raises(ValueError, match="cannot read .*missing.json"):
        encoder_config_from_file(tmp_path / "missing.json")


# Runs in a fresh interpreter: neither its registry nor open_clip has ever seen the file-only encoder.
SERVE_FROM_BANK = """
import json, sys
from bank_builder.encoders import list_encoders
from bank_builder.ingest import iter_samples
from bank_builder.segments import make_segments
from bank_builder.config import IngestConfig, SegmentConfig
from query.regions import embed_masks
from query.serving import ServiceConfig, ServiceState

bank, shard = sys.argv[1:]
assert "file-only-clip" not in list_encoders()
state = ServiceState(ServiceConfig(bank=bank, device="cpu"))
snapshot = state.load()
sample = next(iter_samples(shard, IngestConfig()))
masks = [s.mask for s in make_segments(sample, SegmentConfig(min_area=32))]
result = snapshot.segmenters["superpixel"].open_set(sample.image)
print(json.dumps({"spec": state.encoder.spec.to_dict(), "key": sample.key, "open_set_regions": len(result.regions),
                  "embeddings": embed_masks(state.encoder, sample.image, masks).tolist()}))
"""


def test_a_file_only_encoder_builds_on_ray_workers_and_serves_from_the_bank_alone(tmp_path, ray_local):
    """Before: add_encoder_config filled a process-global registry and the encoder actor said 'unknown encoder'."""
    corpus = make_corpus(str(tmp_path / "corpus"), CorpusConfig(shards=2, samples_per_shard=3, image_size=64, seed=2))
    entry_path = write_entry(tmp_path)
    config = BuildConfig(source=str(tmp_path / "corpus" / "*.tar"), bank=str(tmp_path / "bank"),
                         segments=SegmentConfig(min_area=32),
                         encoder=encoder_config_from_file(entry_path, weights="untrained", seed=5),
                         pipeline=PipelineConfig(batch_size=4, progress_interval_s=0.0))
    for path in tmp_path.glob("file-only-clip*.json"):
        path.unlink()  # from here on the encoder exists only in the job config, then only in the bank

    report = build_bank(config)  # the encoder actor is a Ray worker process of its own

    assert report.ok and report.segments > 0 and report.encoder["name"] == "file-only-clip"
    recorded = read_manifest(config.bank_ref).encoder
    assert recorded["entry"]["model_config"] == MODEL_CONFIG and recorded["visual_dim"] == 32
    assert build_index(config.bank, IndexConfig(autotune_queries=5, nprobe_candidates=(1, 4))).version == "v000002"

    out = subprocess.run([sys.executable, "-c", SERVE_FROM_BANK, config.bank, corpus.shards[0]],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    served = json.loads(out.stdout.strip().splitlines()[-1])
    assert served["spec"] == recorded and served["open_set_regions"] > 0
    # the service's rebuilt encoder embeds the first image's segments as the build did (float16 storage)
    table = read_bank(config.bank)
    rows = [i for i, key in enumerate(table["image_key"].to_pylist()) if key == served["key"]]
    stored = np.stack(table["visual_embedding"].to_numpy(zero_copy_only=False)[rows]).astype(np.float32)
    np.testing.assert_allclose(np.array(served["embeddings"], np.float32), stored, atol=2e-3)
