"""Work sizes of a build (bank_builder.batching): a deterministic batch size from the model and device, recorded
and kept on resume; encoder calls sized at run time from the forward time, which changes no byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bank_builder.batching import (CHUNKS_PER_CALL_MAX, CPU_BATCH_SIZE, CallSizer, chunk_batches,
                                   default_batch_size, resolve_batch_size)
from bank_builder.config import EncoderConfig, PipelineConfig
from bank_builder.encoders import resolve_spec
from bank_builder.format import BankRef, read_manifest
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, make_corpus
from tests.build_helpers import part_digests, tiny_config


def _spec(name: str):
    return resolve_spec(EncoderConfig(name=name, weights="untrained"))


def test_default_batch_size_is_the_same_for_the_same_model_and_device():
    big, small = _spec("clip-vit-b16"), _spec("clip-vit-s32-alt")
    assert default_batch_size(big, "cuda") == default_batch_size(_spec("clip-vit-b16"), "cuda") == 64
    assert default_batch_size(small, "cuda") > default_batch_size(big, "cuda")  # fewer cells: larger batches
    assert default_batch_size(big, "cpu") == default_batch_size(small, "cpu") == CPU_BATCH_SIZE


def test_batch_size_explicit_then_recorded_then_default():
    spec, recorded = _spec("clip-vit-b16"), {"pipeline": {"batch_size": 24}}
    assert resolve_batch_size(PipelineConfig(batch_size=8), spec, "cuda", recorded) == 8
    assert resolve_batch_size(PipelineConfig(), spec, "cuda", recorded) == 24
    assert resolve_batch_size(PipelineConfig(), spec, "cuda", {"pipeline": {"batch_size": None}}) == 64
    assert resolve_batch_size(PipelineConfig(), spec, "cpu", None) == CPU_BATCH_SIZE


def test_chunks_hold_chunk_bytes_of_decoded_input_unless_told():
    assert chunk_batches(PipelineConfig(batches_per_call=3), 16, 224) == 3
    per_batch = 16 * 3 * 224 ** 2
    assert chunk_batches(PipelineConfig(chunk_bytes=5 * per_batch + 1), 16, 224) == 5
    assert chunk_batches(PipelineConfig(chunk_bytes=1), 16, 224) == 1


@pytest.mark.parametrize("seconds_per_image, expected", [(1.0, 1), (0.25 / 64 / 2, 2), (0.0, CHUNKS_PER_CALL_MAX)])
def test_calls_grow_as_the_forward_gets_faster(seconds_per_image, expected):
    sizer = CallSizer(chunk_images=64, adaptive=True)
    assert sizer.chunks_per_call == 1  # nothing measured yet
    for _ in range(5):
        sizer.observe(128, 128 * seconds_per_image)
    assert sizer.chunks_per_call == expected
    fixed = CallSizer(chunk_images=64, adaptive=False)  # an explicit batches_per_call: one chunk a call
    fixed.observe(128, 0.0)
    assert fixed.chunks_per_call == 1


def test_call_sizes_follow_the_encoder_and_change_no_byte(tmp_path, ray_local):
    # 7 images a shard, batch 2, chunks of one batch: 4 chunks a shard, 8 in all.
    make_corpus(str(tmp_path / "corpus"), CorpusConfig(shards=2, samples_per_shard=7, image_size=96, seed=5))
    source = str(tmp_path / "corpus" / "*.tar")
    runs = {"fixed": {"batches_per_call": 1}, "fast": {"stand_in": "tests.paced_encoder", "chunk_bytes": 1},
            "slow": {"stand_in": "tests.paced_encoder_slow", "chunk_bytes": 1}}
    digests, calls = {}, {}
    for name, options in runs.items():
        bank = str(tmp_path / f"bank-{name}")
        report = build_bank(tiny_config(source, bank, batch_size=2, **options))
        assert report.ok
        digests[name], calls[name] = part_digests(bank), report.encoder_calls
    assert digests["fast"] == digests["slow"] == digests["fixed"] and len(digests["fixed"]) == 2
    assert calls["fixed"] == calls["slow"] == 8  # a slow encoder: one chunk a call
    assert calls["fast"] < 8  # a fast one: the chunks that queued behind its first call went together


def test_a_resume_keeps_the_recorded_batch_size(tmp_path, ray_local):
    make_corpus(str(tmp_path / "a"), CorpusConfig(shards=1, samples_per_shard=3, image_size=96, seed=1))
    bank = str(tmp_path / "bank")
    first = build_bank(tiny_config(str(tmp_path / "a" / "*.tar"), bank, batch_size=None))
    assert first.ok and first.batch_size == CPU_BATCH_SIZE  # sized: a CPU actor
    assert read_manifest(BankRef(bank)).build["pipeline"]["batch_size"] == CPU_BATCH_SIZE
    # a bank whose version recorded another batch size (built with --batch-size 2) keeps it when extended
    explicit = str(tmp_path / "bank-2")
    assert build_bank(tiny_config(str(tmp_path / "a" / "*.tar"), explicit, batch_size=2)).ok
    make_corpus(str(tmp_path / "b"), CorpusConfig(shards=1, samples_per_shard=3, image_size=96, seed=2))
    extended = build_bank(tiny_config(str(tmp_path / "{a,b}" / "*.tar"), explicit, batch_size=None))
    assert extended.ok and extended.parts_written == 1 and extended.batch_size == 2
    assert read_manifest(BankRef(explicit)).build["pipeline"]["batch_size"] == 2



def test_a_failed_call_of_several_shards_loses_nothing_of_the_others(tmp_path, ray_local):
    # 3 shards of 7 images, batch 2, one batch a chunk: 12 chunks. The fast encoder groups waiting chunks of several
    # shards into one call, and every call holding shard 1 fails: the other shards' chunks in those calls must be
    # sent again (alone) and committed; shard 1 fails after its attempts and nothing is published. A resume with a
    # sound encoder then builds shard 1 alone, and the bank is byte for byte a clean build's.
    from tests import faulty_encoder

    make_corpus(str(tmp_path / "corpus"), CorpusConfig(shards=3, samples_per_shard=7, image_size=96, seed=6))
    source, bank = str(tmp_path / "corpus" / "*.tar"), str(tmp_path / "bank")
    faulty_encoder.LOG.unlink(missing_ok=True)
    report = build_bank(tiny_config(source, bank, stand_in="tests.faulty_encoder", chunk_bytes=1))
    calls = [json.loads(line) for line in faulty_encoder.LOG.read_text().splitlines()]
    assert any(c["failed"] and len(c["shards"]) > 1 for c in calls), calls  # the case under test happened
    assert [Path(f.shard).name for f in report.failed] == [f"{faulty_encoder.BAD_SHARD}.tar"]
    assert report.version is None and report.parts_written == 2
    resumed = build_bank(tiny_config(source, bank, batches_per_call=1))
    assert resumed.ok and resumed.parts_written == 1 and resumed.parts_skipped == 2
    clean = str(tmp_path / "clean")
    assert build_bank(tiny_config(source, clean, batches_per_call=1)).ok
    assert part_digests(bank) == part_digests(clean)


def test_a_failed_call_of_several_chunks_is_retried_chunk_by_chunk(tmp_path, ray_local, caplog):
    # The stand-in fails its first call that carries several chunks; each goes again alone, none lost or repeated.
    make_corpus(str(tmp_path / "corpus"), CorpusConfig(shards=2, samples_per_shard=7, image_size=96, seed=5))
    source = str(tmp_path / "corpus" / "*.tar")
    fixed, flaky = str(tmp_path / "bank-fixed"), str(tmp_path / "bank-flaky")
    assert build_bank(tiny_config(source, fixed, batch_size=2, batches_per_call=1)).ok
    with caplog.at_level("INFO", logger="refbank.build"):
        report = build_bank(tiny_config(source, flaky, batch_size=2, chunk_bytes=1,
                                        stand_in="tests.flaky_merged_encoder"))
    assert report.ok and report.shard_retries == 0 and report.actor_restarts == 0  # no shard paid for it
    assert any("sending each again alone" in r.getMessage() for r in caplog.records)  # the failure did happen
    assert part_digests(flaky) == part_digests(fixed)  # every row once, in order, same bytes
