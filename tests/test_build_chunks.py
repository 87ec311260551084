"""Chunking: how many batches travel in one encoder call changes the driver's cost, never a byte of the bank."""

from __future__ import annotations

from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, make_corpus
from tests.build_helpers import part_digests, tiny_config


def test_batches_per_call_changes_no_byte(tmp_path, ray_local):
    # 7 images a shard, batch 2: chunks of 1 and of 3 batches split the shards differently, with short tails.
    make_corpus(str(tmp_path / "corpus"), CorpusConfig(shards=2, samples_per_shard=7, image_size=96, seed=5))
    source = str(tmp_path / "corpus" / "*.tar")
    digests = []
    for per_call in (1, 3):
        bank = str(tmp_path / f"bank-{per_call}")
        assert build_bank(tiny_config(source, bank, batch_size=2, batches_per_call=per_call)).ok
        digests.append(part_digests(bank))
    assert digests[0] == digests[1] and len(digests[0]) == 2
