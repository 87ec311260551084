"""Every expected failure of `refbank` is one line on stderr with a documented exit status, or with --json one error
object on stdout: missing and un-indexed banks, option mismatches, source folders, unquoted globs, S3 without
credentials or without an endpoint. Run as a user runs it (the console script in a subprocess)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, make_corpus
from jobs.errors import INTERNAL, INTERRUPTED, report
from tests.build_helpers import tiny_config
from tests.cli_helpers import TINY, assert_json_error, assert_one_line, refbank


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    """(corpus folder, a built bank without an index)."""
    root = tmp_path_factory.mktemp("errors")
    make_corpus(str(root / "corpus"), CorpusConfig(shards=3, samples_per_shard=2, image_size=64, seed=3))
    assert build_bank(tiny_config(str(root / "corpus" / "*.tar"), str(root / "bank"))).ok
    return root / "corpus", root / "bank"


def _both(args: list[str], status: int, kind: str, *phrases: str) -> None:
    """The failure of `refbank ARGS` as one line, and as a JSON error object with --json."""
    assert_one_line(refbank(*args), status, *phrases)
    assert_json_error(refbank(*args, "--json"), status, kind)


@pytest.mark.parametrize("command", ["serve", "index", "info"])
def test_a_bank_path_where_nothing_is_stored(tmp_path, command):
    _both([command, str(tmp_path / "no-bank")], 2, "bank_not_found", f"no bank at {tmp_path / 'no-bank'}",
          "check the path")


def test_serve_refuses_an_unindexed_bank_before_loading_the_encoder(built):
    _, bank = built
    started = time.monotonic()
    line = assert_one_line(refbank("serve", str(bank)), 2, "has no index", f"refbank index {bank}")
    # The encoder would log (its UNTRAINED warning) once loaded: the refusal comes first.
    assert "UNTRAINED" not in line and time.monotonic() - started < 60
    assert_json_error(refbank("serve", str(bank), "--version", "v000001", "--json"), 2, "bank_not_indexed")


def test_a_bank_built_with_other_options_names_them(built):
    corpus, bank = built
    _both(["build", str(corpus / "*.tar"), str(bank), *TINY, "--seed", "3", "--mask-kind", "class"], 2,
          "bank_mismatch", "encoder.seed: bank 0, this build 3", "ingest.mask_kind: bank 'auto', this build 'class'")


def test_a_source_folder_and_an_unquoted_glob(built, tmp_path):
    corpus, _ = built
    shards = sorted(str(p) for p in corpus.glob("*.tar"))
    _both(["build", str(corpus), str(tmp_path / "b")], 2, "source_is_folder", f"'{corpus}/*.tar'")
    # The shell expanded corpus/*.tar: with 2 shards the second one arrives as the bank, with 3 one is left over.
    _both(["build", *shards[:2]], 2, "unquoted_glob", "is a file, not a bank folder", "Quote the pattern")
    _both(["build", *shards, str(tmp_path / "b")], 2, "extra_arguments", "quote the pattern")
    assert not (tmp_path / "b").exists()


def _without_credentials() -> dict[str, str]:
    """This environment without any AWS credentials (and without the instance-metadata lookup, which would leave
    127.0.0.1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def test_s3_without_credentials(built, s3, tmp_path):
    corpus, _ = built
    options, bucket = s3
    endpoint = ["--endpoint-url", options["endpoint_url"]]
    env = _without_credentials()
    for args, failed in ((["build", f"s3://{bucket}/corpus/*.tar", str(tmp_path / "b"), *TINY[:4]],  # S3 source
                          f"storage list of s3://{bucket}/corpus/*.tar failed"),
                         (["build", str(corpus / "*.tar"), f"s3://{bucket}/bank", *TINY[:4]],  # S3 bank
                          f"storage read of s3://{bucket}/bank/CURRENT failed"),
                         (["info", f"s3://{bucket}/bank"], f"storage read of s3://{bucket}/bank/CURRENT failed")):
        assert_one_line(refbank(*args, *endpoint, env=env, fast_retries=True), 3, failed, "NoCredentialsError",
                        "AWS_ACCESS_KEY_ID")
    assert_json_error(refbank("info", f"s3://{bucket}/bank", *endpoint, "--json", env=env, fast_retries=True), 3,
                      "no_credentials")


def test_an_unreachable_endpoint_is_not_reported_as_missing_shards(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    # Named shards (braces) used to be checked with fsspec's isfile, which says False when the store is down.
    for source in ("s3://bucket/corpus/train-{000000..000001}.tar", "s3://bucket/corpus/*.tar"):
        line = assert_one_line(refbank("build", source, str(tmp_path / "b"), *TINY[:4], "--endpoint-url", closed,
                                       fast_retries=True), 3, "gave up after 3 tries", "--endpoint-url")
        assert "no shard matches" not in line
    assert_json_error(refbank("index", "s3://bucket/bank", "--endpoint-url", closed, "--json", fast_retries=True), 3,
                      "endpoint_unreachable")


def test_an_unexpected_error_keeps_its_traceback_and_exits_70(capsys):
    assert report(RuntimeError("boom"), as_json=True) == INTERNAL
    out = capsys.readouterr()
    assert json.loads(out.out)["error"] == "internal" and "RuntimeError: boom" in out.err  # the traceback
    assert report(KeyboardInterrupt(), as_json=False) == INTERRUPTED
    assert capsys.readouterr().err == "interrupted — re-run the same command to resume\n"
