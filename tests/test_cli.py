"""The `refbank` command line as a user runs it: help, make-corpus, build, exit codes, resume after a kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bank_builder.encoders import get_encoder_entry
from bank_builder.format import BankRef, current_version, read_manifest
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, make_corpus
from jobs.build_cli import run_build
from tests.build_helpers import assert_same_bank, read_bank, tiny_config
from tests.cli_helpers import TINY, refbank


def test_help_explains_the_commands():
    out = refbank("--help").stdout
    for command in ["make-corpus", "build", "encoders", "demo"]:
        assert command in out
    build_help = refbank("build", "--help").stdout
    assert "--weights" in build_help and "untrained" in build_help and "Exit status" in build_help


def _own_encoder_file(folder: Path) -> Path:
    """tiny-clip's entry under a name of its own, in a file beside its open_clip model config file."""
    entry = {**get_encoder_entry("tiny-clip"), "name": "my-tiny-clip", "model_config": "my-tiny-clip-model.json"}
    (folder / "my-tiny-clip-model.json").write_text(json.dumps(get_encoder_entry("tiny-clip")["model_config"]))
    (folder / "my-tiny-clip.json").write_text(json.dumps(entry))
    return folder / "my-tiny-clip.json"


def test_make_corpus_build_and_rebuild(tmp_path):
    """The README's flow: a class-mask corpus, built with the default mask kind and one's own encoder file."""
    corpus, bank = tmp_path / "corpus", tmp_path / "bank"
    made = refbank("make-corpus", str(corpus), "--shards", "2", "--samples-per-shard", "4", "--image-size", "96",
                   "--mask-kind", "class")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in corpus.iterdir()) == ["train-000000.tar", "train-000001.tar"]
    own = ["--encoder-config", str(_own_encoder_file(tmp_path)), *TINY[2:]]
    built = refbank("build", str(corpus / "train-{000000..000001}.tar"), str(bank), *own)
    assert built.returncode == 0, built.stderr
    assert "published version v000001" in built.stdout and "UNTRAINED" in built.stdout
    assert "labelled by their masks, 0 not" in built.stdout and "NO LABEL" not in built.stderr
    assert "[build] shards" in built.stderr  # progress lines
    table = read_bank(str(bank))
    assert None not in table["label"].to_pylist() and set(table["mask_kind"].to_pylist()) == {"class"}
    assert read_manifest(BankRef(str(bank))).encoder["entry"]["name"] == "my-tiny-clip"
    again = refbank("build", str(corpus / "*.tar"), str(bank), *own)
    assert again.returncode == 0 and "already up to date" in again.stdout


def test_masks_read_as_the_wrong_kind_give_a_loud_warning(tmp_path, ray_local, capsys):
    """The issue's silent case: a class corpus built as instance masks used to give null labels and exit 0 quietly."""
    make_corpus(str(tmp_path / "c"), CorpusConfig(shards=1, samples_per_shard=3, image_size=64, mask_kind="class"))
    config = tiny_config(str(tmp_path / "c" / "*.tar"), str(tmp_path / "bank"), mask_kind="instance")
    assert run_build(config, None, as_json=True) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    # the corpus's json phrases may label some by pairing; what the masks left unlabelled is reported all the same
    assert report["labelled"] == report["paired"]
    assert report["unlabelled_by_kind"] == {"instance": report["segments"]} != {}
    assert f"WARNING   {report['segments']} of {report['segments']} segments have NO LABEL" in out.err
    assert "instance masks need json `segments`" in out.err and "--mask-kind auto" in out.err


def test_a_bad_encoder_config_file_exits_2_with_one_line(tmp_path):
    out = refbank("build", str(tmp_path / "*.tar"), str(tmp_path / "bank"), "--encoder-config", str(tmp_path / "no.json"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: encoder config: cannot read") and "no.json" in out.stderr


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
    # The driver and everything it started, mid-build. Ray may start workers outside the driver's process group,
    # and a writer left running would commit a part after the count below: kill and wait for every descendant.
    started = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
    psutil.wait_procs(started, timeout=30)
    committed = len(list((bank / "parts").glob("*.json")))
    assert 1 <= committed < 12, f"the kill should land after the first part and before the last ({committed})"
    assert current_version(BankRef(str(bank))) is None

    resumed = build_bank(tiny_config(str(corpus / "*.tar"), str(bank)))
    assert resumed.ok and resumed.parts_skipped == committed and resumed.parts_written == 12 - committed
    build_bank(tiny_config(str(corpus / "*.tar"), str(clean)))
    assert_same_bank(read_bank(str(bank)), read_bank(str(clean)))


def test_python_dash_m_runs_every_command():
    # `python -m jobs.cli` used to know only the commands defined in jobs/cli.py itself (build, eval, curate... are
    # registered by other modules on the imported copy of the app, not on `__main__`'s).
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    for command in ("build", "index", "eval", "curate", "info"):
        done = subprocess.run([sys.executable, "-m", "jobs.cli", command, "--help"], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0 and f"jobs.cli {command}" in done.stdout, done.stdout + done.stderr
