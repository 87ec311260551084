"""The `refbank` command line as a user runs it: help, make-corpus, build, exit codes, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bank_builder.format import BankRef, current_version
from bank_builder.pipeline import build_bank
from tests.build_helpers import assert_same_bank, read_bank, tiny_config

TINY = ["--encoder", "tiny-clip", "--weights", "untrained", "--batch-size", "4", "--min-area", "32"]


def refbank(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the installed console script."""
    exe = Path(sys.executable).with_name("refbank")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_help_explains_the_commands():
    out = refbank("--help").stdout
    for command in ["make-corpus", "build", "encoders", "demo"]:
        assert command in out
    build_help = refbank("build", "--help").stdout
    assert "--weights" in build_help and "untrained" in build_help and "Exit status" in build_help


def test_make_corpus_build_and_rebuild(tmp_path):
    corpus, bank = tmp_path / "corpus", tmp_path / "bank"
    made = refbank("make-corpus", str(corpus), "--shards", "2", "--samples-per-shard", "4", "--image-size", "96")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in corpus.iterdir()) == ["train-000000.tar", "train-000001.tar"]
    built = refbank("build", str(corpus / "train-{000000..000001}.tar"), str(bank), *TINY)
    assert built.returncode == 0, built.stderr
    assert "published version v000001" in built.stdout and "UNTRAINED" in built.stdout
    assert "[build] shards" in built.stderr  # progress lines
    again = refbank("build", str(corpus / "*.tar"), str(bank), *TINY)
    assert again.returncode == 0 and "already up to date" in again.stdout


@pytest.mark.parametrize("encoder", ["tiny-clip", "clip-vit-b32"])
def test_unavailable_weights_exit_2_with_the_fix(tmp_path, encoder):
    # tiny-clip has no published weights (refused before Ray starts); clip-vit-b32's cannot be
    # downloaded offline (the encoder actor fails to load them).
    refbank("make-corpus", str(tmp_path / "c"), "--shards", "1", "--samples-per-shard", "2", "--image-size", "96")
    out = refbank("build", str(tmp_path / "c" / "*.tar"), str(tmp_path / "bank"), "--encoder", encoder)
    assert out.returncode == 2, out.stderr
    assert "untrained" in out.stderr and "Traceback" not in out.stderr
    assert current_version(BankRef(str(tmp_path / "bank"))) is None


def test_failed_shard_exits_1_and_lists_it(tmp_path):
    refbank("make-corpus", str(tmp_path / "c"), "--shards", "1", "--samples-per-shard", "2", "--image-size", "96")
    (tmp_path / "c" / "train-000001.tar").write_bytes(b"garbage" * 50)
    out = refbank("build", str(tmp_path / "c" / "*.tar"), str(tmp_path / "bank"), *TINY, "--max-attempts", "1")
    assert out.returncode == 1
    assert "FAILED" in out.stdout and "train-000001.tar" in out.stdout
    assert current_version(BankRef(str(tmp_path / "bank"))) is None


def test_killed_build_resumes_to_the_same_bank(tmp_path, ray_local):
    corpus, bank, clean = tmp_path / "corpus", tmp_path / "bank", tmp_path / "clean"
    refbank("make-corpus", str(corpus), "--shards", "12", "--samples-per-shard", "4", "--image-size", "96", "--seed", "4")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("refbank")), "build", str(corpus / "*.tar"), str(bank),
                             *TINY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while not list((bank / "parts").glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid-build
    proc.wait()
    committed = len(list((bank / "parts").glob("*.json")))
    assert 1 <= committed < 12, f"the kill should land after the first part and before the last ({committed})"
    assert current_version(BankRef(str(bank))) is None

    resumed = build_bank(tiny_config(str(corpus / "*.tar"), str(bank)))
    assert resumed.ok and resumed.parts_skipped == committed and resumed.parts_written == 12 - committed
    build_bank(tiny_config(str(corpus / "*.tar"), str(clean)))
    assert_same_bank(read_bank(str(bank)), read_bank(str(clean)))
