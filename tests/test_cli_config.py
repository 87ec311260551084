"""`--config FILE` (YAML or JSON) on build, index and serve: the file's options are used, flags win, and a bad key
or value is one line naming the file and the key. Also the --json outputs and --version."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from bank_builder.format import BankRef, read_manifest
from bank_builder.synthetic import CorpusConfig, make_corpus
from jobs.cli import app
from jobs.config_files import ConfigFileError, options_from_file
from tests.cli_helpers import REFBANK, assert_one_line, refbank

BUILD_YAML = """\
# what a data team keeps next to its corpus
encoder: tiny-clip
weights: untrained
seed: 5
min-area: 32          # dashes read as underscores
batch_size: 4
mask_kind: class
on_missing_mask: reject
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    """(folder, bank, the build's JSON report): a class-mask corpus built from build.yaml with --seed on top."""
    root = tmp_path_factory.mktemp("config")
    make_corpus(str(root / "corpus"), CorpusConfig(shards=2, samples_per_shard=3, image_size=64, mask_kind="class"))
    (root / "build.yaml").write_text(BUILD_YAML)
    run = CliRunner().invoke(app, ["build", str(root / "corpus" / "*.tar"), str(root / "bank"), "--config",
                                   str(root / "build.yaml"), "--seed", "7", "--json"])
    assert run.exit_code == 0, run.output
    return root, root / "bank", json.loads(run.stdout)


def test_build_takes_its_options_from_the_file_and_flags_win(built):
    _, bank, report = built
    recorded = read_manifest(BankRef(str(bank)))
    assert report["published"] and report["version"] == recorded.version == "v000001"
    assert recorded.build["ingest"]["mask_kind"] == "class" and recorded.build["ingest"]["on_missing_mask"] == "reject"
    assert recorded.build["segments"]["min_area"] == 32 and recorded.build["pipeline"]["batch_size"] == 4
    assert recorded.encoder["name"] == "tiny-clip" and recorded.encoder["untrained"]
    assert recorded.build["encoder"]["seed"] == 7  # the flag, not the file's 5
    assert report["labelled"] == report["segments"] > 0


@pytest.fixture(scope="module")
def indexed(built):
    root, bank, _ = built
    (root / "index.json").write_text(json.dumps({"refine": False, "target_recall": 0.5, "object_mb": 1}))
    run = CliRunner().invoke(app, ["index", str(bank), "--config", str(root / "index.json"), "--json"])
    assert run.exit_code == 0, run.output
    return json.loads(run.stdout)


def test_index_takes_its_options_from_a_json_file(built, indexed):
    _, bank, _ = built
    entry = read_manifest(BankRef(str(bank))).index
    assert indexed["refine_factor"] == 0 and entry.refine_factor == 0 and entry.target_recall == 0.5


def test_serve_takes_its_options_from_the_file(built, indexed):
    root, bank, _ = built
    (root / "serve.yaml").write_text("port: 0\nas_json: true\ntoken: s3cret\nmemory_mb: 64\n")
    server = subprocess.Popen([REFBANK, "serve", str(bank), "--config", str(root / "serve.yaml")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        ready = json.loads(server.stdout.readline())  # printed once the bank is loaded and the port listens
        assert ready["event"] == "listening" and ready["version"] == "v000002" and ready["untrained"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(ready["url"] + "/v1/bank", timeout=30)
        assert refused.value.code == 401  # the file's token guards /v1
        request = urllib.request.Request(ready["url"] + "/v1/bank", headers={"Authorization": "Bearer s3cret"})
        assert json.loads(urllib.request.urlopen(request, timeout=30).read())["version"] == "v000002"
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn's way out
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err[-3000:]
    assert "INFO refbank.service: serving" in err and "listening on http://127.0.0.1:" in err
    assert "INFO root" not in err and "open_clip" not in err  # library INFO lines need -v


def test_bad_keys_and_values_name_the_file_and_the_key(tmp_path):
    build = typer.main.get_command(app).commands["build"]
    cases = {
        "mask_kindd: class\n": "unknown key 'mask_kindd' in c.yaml (did you mean 'mask_kind'?); known: as_json, "
                               "batch_size, batches_per_call, encoder,",
        "batch_size: eight\n": "c.yaml: key 'batch_size' must be an integer, got 'eight' (str)",
        "batch_size: true\n": "c.yaml: key 'batch_size' must be an integer, got True (bool)",
        "mask_kind: klass\n": "c.yaml: key 'mask_kind' must be one of auto, instance, class, binary, rle, none",
        "verbose: 1\n": "c.yaml: key 'verbose' must be true or false",
        "storage_option: endpoint_url=x\n": "c.yaml: key 'storage_option' must be a list",
        "- mask_kind\n": "must hold a mapping of option names to values, not a list",
        "mask_kind: [\n": "is not valid YAML",
    }
    for text, message in cases.items():
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigFileError) as caught:
            options_from_file(build, tmp_path / "c.yaml")
        assert message in str(caught.value), (text, str(caught.value))
    (tmp_path / "c.json").write_text('{"storage_option": {"endpoint_url": "http://127.0.0.1:9"}, "seed": 3}')
    assert options_from_file(build, tmp_path / "c.json") == {"storage_option": ["endpoint_url=http://127.0.0.1:9"],
                                                              "seed": 3}
    # As the user meets it: one line, exit status 2, before anything runs.
    (tmp_path / "index.yaml").write_text("mask_kind: class\n")
    assert_one_line(refbank("index", str(tmp_path / "bank"), "--config", str(tmp_path / "index.yaml")), 2,
                    "unknown key 'mask_kind' in index.yaml", "known: ")
    assert_one_line(refbank("info", str(tmp_path), "--config", str(tmp_path / "none.yaml")), 2,
                    "cannot read config file", "none.yaml")


def test_json_outputs_and_version(tmp_path):
    runner = CliRunner()
    listing = runner.invoke(app, ["encoders", "--json"])
    assert listing.exit_code == 0
    entries = {e["name"]: e for e in json.loads(listing.stdout)}
    assert entries["tiny-clip"]["family"] == "open_clip" and "STAND-IN" in entries["synthetic-clip"]["note"]
    made = runner.invoke(app, ["make-corpus", str(tmp_path / "c"), "--shards", "1", "--samples-per-shard", "2",
                               "--image-size", "64", "--json"])
    summary = json.loads(made.stdout)
    assert made.exit_code == 0 and summary["samples"] == 2 and len(summary["shards"]) == 1
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("refbank ")


def test_the_readme_config_example_is_a_valid_build_config(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (tmp_path / "build.yaml").write_text(re.search(r"```yaml\n(.*?)```", readme, re.S).group(1))
    options = options_from_file(typer.main.get_command(app).commands["build"], tmp_path / "build.yaml")
    assert options["mask_kind"] == "class" and options["storage_option"] == ["endpoint_url=http://minio:9000"]
