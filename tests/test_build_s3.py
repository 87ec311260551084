"""The build with a real S3 endpoint (moto server on 127.0.0.1) as both source and destination."""

from __future__ import annotations

import pytest
import s3fs

from bank_builder.format import BankRef, parts, read_manifest
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, make_corpus
from tests.build_helpers import read_bank, tiny_config

pytestmark = pytest.mark.usefixtures("ray_local")


def test_build_from_s3_to_s3(s3):
    options, bucket = s3
    corpus = make_corpus(f"s3://{bucket}/corpus", CorpusConfig(shards=2, samples_per_shard=4, image_size=96,
                                                               mask_kind="rle", seed=3), options)
    bank = f"s3://{bucket}/banks/demo"
    # SA-1B-style rle.json samples, read by the default mask_kind=auto
    report = build_bank(tiny_config(f"s3://{bucket}/corpus/train-{{000000..000001}}.tar", bank, options))
    assert report.ok and report.version == "v000001" and report.samples == corpus.samples

    fs = s3fs.S3FileSystem(**options)
    assert fs.cat_file(f"{bucket}/banks/demo/CURRENT").decode().strip() == "v000001"
    ref = BankRef(bank, options)
    m = read_manifest(ref)
    assert [p.source for p in m.parts] == corpus.shards
    for p in m.parts:
        assert fs.exists(f"{bucket}/banks/demo/parts/{p.name}.parquet")
        assert fs.exists(f"{bucket}/banks/demo/rejects/{p.name}.parquet")
    table = read_bank(bank, options)
    assert table.num_rows == report.segments > 0
    assert set(table["label_source"].to_pylist()) == {"ground_truth"}  # rle.json annotations carry labels
    assert set(table["mask_kind"].to_pylist()) == {"rle"} and report.unlabelled == 0

    again = build_bank(tiny_config(f"s3://{bucket}/corpus/train-*.tar", bank, options))
    assert again.up_to_date and again.parts_written == 0
    assert parts.read_commit(ref, m.parts[0].name).rows == m.parts[0].rows
