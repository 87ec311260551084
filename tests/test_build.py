"""The Ray build end to end on a generated corpus: contents, resume, extend, exactly-once, failures."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from bank_builder.format import BankMismatchError, BankRef, current_version, list_versions, parts, read_manifest
from bank_builder.encoders import resolve_spec
from bank_builder.pipeline import build_bank, build_fingerprint
from bank_builder.synthetic import CorpusConfig, make_corpus
from tests.build_helpers import assert_same_bank, read_bank, tiny_config

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 shards × 6 instance-mask samples at 96 px."""
    root = tmp_path_factory.mktemp("corpus")
    summary = make_corpus(str(root), CorpusConfig(shards=4, samples_per_shard=6, image_size=96, seed=1))
    return root, summary


@pytest.fixture(scope="module")
def clean_bank(corpus, tmp_path_factory, ray_local):
    """A bank built once, uninterrupted: the reference the other builds must reproduce."""
    root, _ = corpus
    bank = str(tmp_path_factory.mktemp("clean") / "bank")
    report = build_bank(tiny_config(str(root / "train-*.tar"), bank))
    return bank, report


def _labels_from_corpus(shard: str) -> dict[tuple[str, int], str]:
    """(image key, instance id) → label, from the json members of a shard."""
    labels = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                key = member.name.split(".", 1)[0]
                for seg in json.loads(tar.extractfile(member).read())["segments"]:
                    labels[key, seg["id"]] = seg["label"]
    return labels


def test_build_writes_every_segment_with_its_label(corpus, clean_bank):
    root, summary = corpus
    bank, report = clean_bank
    assert report.ok and report.version == "v000001" and report.parts_written == 4
    m = read_manifest(BankRef(bank))
    assert [p.ordinal for p in m.parts] == [0, 1, 2, 3]
    assert m.encoder["untrained"] and m.encoder["name"] == "tiny-clip"
    assert "storage_options" not in m.build
    table = read_bank(bank)
    assert table.num_rows == m.totals["segments"] == report.segments == report.labelled
    assert report.unlabelled == 0 and report.unlabelled_by_kind == {}
    assert report.part_labels == {p.name: {"labelled": p.rows, "unlabelled": 0} for p in m.parts}
    assert set(table["mask_kind"].to_pylist()) == {"instance"}  # read by the default mask_kind=auto
    assert report.samples == summary.samples == 24
    ids = table["segment_id"].to_pylist()
    assert len(set(ids)) == len(ids)
    expected = {}
    for shard in summary.shards:
        expected.update(_labels_from_corpus(shard))
    # Every ground-truth instance of at least min_area pixels is a row with the corpus label.
    got = {(k, i): lab for k, i, lab in zip(table["image_key"].to_pylist(), table["segment_index"].to_pylist(),
                                            table["label"].to_pylist())}
    assert set(got.values()) <= set(expected.values())
    assert len(got) == len(expected) == table.num_rows
    visual = np.stack(table["visual_embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(visual, axis=1), 1.0, atol=2e-3)
    assert not table["text_embedding"].is_null().to_pylist().count(True)
    for p in m.parts:
        ids = parts.read_part(BankRef(bank), p.name)["segment_id"].to_pylist()
        ordinal, row = zip(*(parts.split_segment_id(s) for s in ids))
        assert set(ordinal) == {p.ordinal} and list(row) == list(range(p.rows))


def test_rebuild_reuses_committed_parts(corpus, clean_bank):
    root, _ = corpus
    bank, _ = clean_bank
    report = build_bank(tiny_config(str(root / "train-*.tar"), bank))
    assert report.up_to_date and not report.published and report.version == "v000001"
    assert (report.parts_written, report.parts_skipped) == (0, 4)
    assert current_version(BankRef(bank)) == "v000001"


def test_extend_adds_a_version_with_stable_ordinals(corpus, clean_bank, tmp_path):
    root, _ = corpus
    bank = str(tmp_path / "bank")
    shutil.copytree(clean_bank[0], bank)
    extra = tmp_path / "more"
    make_corpus(str(extra), CorpusConfig(shards=1, samples_per_shard=3, image_size=96, seed=9))
    shutil.copy(extra / "train-000000.tar", root / "train-000099.tar")
    try:
        report = build_bank(tiny_config(str(root / "train-*.tar"), bank))
    finally:
        (root / "train-000099.tar").unlink()
    assert report.version == "v000002" and (report.parts_written, report.parts_skipped) == (1, 4)
    m = read_manifest(BankRef(bank))
    assert [p.ordinal for p in m.parts] == [0, 1, 2, 3, 4] and m.parent == "v000001"
    assert m.parts[4].source.endswith("train-000099.tar")


_REPO = Path(__file__).resolve().parents[1]


def _build_in_another_process(source: str, bank: str) -> subprocess.CompletedProcess:
    """A whole build in a second Python process with its own local Ray: a concurrent writer."""
    code = ("from bank_builder.pipeline import build_bank; from tests.build_helpers import tiny_config; "
            f"r = build_bank(tiny_config({source!r}, {bank!r})); print(r.version)")
    env = {**os.environ, "PYTHONPATH": str(_REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run([sys.executable, "-c", code], cwd=_REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_two_builds_adding_shards_at_once_lose_nothing(corpus, clean_bank, tmp_path):
    """Build A adds shard X; while A encodes, build B (another process) adds shard Y and publishes first.
    Both planned Y and X as ordinal 4: A must re-plan on top of B's version, never drop Y or reuse its ids."""
    root, _ = corpus
    bank = str(tmp_path / "bank")
    shutil.copytree(clean_bank[0], bank)
    more = tmp_path / "more"
    make_corpus(str(more / "x"), CorpusConfig(shards=1, samples_per_shard=3, image_size=96, seed=11))
    make_corpus(str(more / "y"), CorpusConfig(shards=1, samples_per_shard=3, image_size=96, seed=12))
    x, y = str(more / "x" / "train-000000.tar"), str(more / "y" / "train-000000.tar")
    concurrent = []

    def race(progress):
        if not concurrent and progress.images:  # A is encoding, its plan (X as ordinal 4) already made
            concurrent.append(_build_in_another_process(f"{{{root}/train-*.tar,{y}}}", bank))

    report = build_bank(tiny_config(f"{{{root}/train-*.tar,{x}}}", bank), on_progress=race)
    other = concurrent[0]
    assert other.returncode == 0, other.stderr[-3000:]
    assert other.stdout.split()[-1] == "v000002"
    assert report.ok and report.version == "v000003"
    m = read_manifest(BankRef(bank))
    assert m.parent == "v000002" and list_versions(BankRef(bank)) == ["v000001", "v000002", "v000003"]
    by_source = {p.source: p for p in m.parts}
    assert (by_source[y].ordinal, by_source[x].ordinal) == (4, 5)  # Y kept B's ordinal; X moved after it
    table = read_bank(bank)
    ids = table["segment_id"].to_pylist()
    assert len(ids) == len(set(ids)) == m.totals["segments"]
    # X's rows were renumbered, not re-encoded: its embeddings equal those of the part A wrote as ordinal 4.
    first = parts.read_part(BankRef(bank), parts.part_name(x, 4, m.fingerprint))
    moved = parts.read_part(BankRef(bank), by_source[x].name)
    assert moved["segment_id"].to_pylist() == [parts.segment_id(5, r) for r in range(moved.num_rows)]
    for column in ["image_key", "segment_index", "label", "mask", "visual_embedding", "text_embedding"]:
        assert moved[column].to_pylist() == first[column].to_pylist(), column
    # No object that any published version names was rewritten.
    for version in list_versions(BankRef(bank)):
        for part in read_manifest(BankRef(bank), version).parts:
            data = Path(parts.part_url(BankRef(bank), part.name)).read_bytes()
            assert hashlib.sha256(data).hexdigest() == part.sha256, (version, part.name)


def test_other_encoder_options_are_refused(corpus, clean_bank):
    root, _ = corpus
    config = tiny_config(str(root / "train-*.tar"), clean_bank[0])
    config = type(config)(**{**vars(config), "encoder": type(config.encoder)(name="tiny-clip", weights="untrained", seed=7)})
    with pytest.raises(BankMismatchError, match="new bank URI"):
        build_bank(config)


def test_killed_encoder_actor_loses_and_duplicates_nothing(corpus, clean_bank, tmp_path):
    root, _ = corpus
    killed = []

    def kill_once(progress):
        # After the first encoded batch, while most shards are still to come.
        if not killed and progress.images and progress.shards_done < progress.shards_total - 1:
            killed.append(progress.encoder_actors[0])
            ray.kill(ray.get_actor(progress.encoder_actors[0]))

    bank = str(tmp_path / "bank")
    report = build_bank(tiny_config(str(root / "train-*.tar"), bank), on_progress=kill_once)
    assert killed and report.ok and report.actor_restarts >= 1
    assert_same_bank(read_bank(bank), read_bank(clean_bank[0]))


@ray.remote(num_cpus=0.5)  # the CPUs a 2-CPU node's encoder leaves for decode: two such tasks want more
def _hold_a_cpu() -> None:
    time.sleep(300)


@pytest.mark.timeout(120)
def test_a_dead_encoders_cpus_stay_reserved_for_its_replacement(ray_local):
    """Tasks queued for CPUs (decode tasks) must not take the CPU a dead encoder actor held: blocked on
    backpressure, they would never give it back and the replacement would wait forever (a build hung so)."""
    from bank_builder.encoder_pool import EncoderPool

    config = tiny_config("unused", "unused")
    pool = EncoderPool(config.encoder, config.pipeline)
    blockers = [_hold_a_cpu.remote() for _ in range(2)]  # one runs, one waits for a CPU
    try:
        dead = pool.slots[0].actor
        ray.kill(dead)
        time.sleep(2)  # the waiting task would take the freed CPU now, were it not reserved
        pool.replace_if_dead(0, dead, ray.exceptions.RayActorError())
        assert pool.restarts == 1 and pool.slots[0].actor is not dead
        ray.get(pool.slots[0].loading, timeout=60)  # the replacement is placed and loads (it does not wait forever)
    finally:
        for ref in blockers:
            ray.cancel(ref, force=True)
        pool.shutdown()


def _bad_member_shard(path, good_shard: str) -> None:
    """A shard: two good samples copied from `good_shard`, then samples that each break one rule."""
    with tarfile.open(good_shard) as src:
        members = [(m.name, src.extractfile(m).read()) for m in src.getmembers()][:6]
    png = members[2][1]  # the first sample's mask.png
    members += [("bad-json.jpg", members[0][1]), ("bad-json.json", b"{not json"), ("bad-json.mask.png", png),
                ("bad-image.jpg", b"\xff\xd8 not a jpeg"), ("bad-image.json", b"{}"),
                ("no-image.json", b"{}"), ("no-image.mask.png", png),
                ("no-mask.jpg", members[0][1]), ("no-mask.json", b"{}"),
                ("unnamed-mask.jpg", members[0][1]), ("unnamed-mask.mask.png", png)]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_become_rejects_and_bad_shards_fail_the_build(corpus, tmp_path):
    root, summary = corpus
    src = tmp_path / "src"
    src.mkdir()
    _bad_member_shard(src / "a-mixed.tar", summary.shards[0])
    (src / "b-garbage.tar").write_bytes(b"this is not a tar file at all" * 100)
    bank = str(tmp_path / "bank")
    config = tiny_config(str(src / "*.tar"), bank, max_attempts=2)
    report = build_bank(config)
    assert not report.ok and report.version is None and current_version(BankRef(bank)) is None
    assert [f.shard for f in report.failed] == [str(src / "b-garbage.tar")]
    assert "ShardReadError" in report.failed[0].error
    assert report.shard_retries == 1  # tried twice, then reported
    # The good shard's part is committed (a re-run reuses it) and its rejects carry their reasons.
    name = parts.part_name(str(src / "a-mixed.tar"), 0, build_fingerprint(config, resolve_spec(config.encoder)))
    info = parts.read_commit(BankRef(bank), name)
    # In a shard with masks, a sample without a usable one is a reject, not a silently unlabelled image.
    assert info.samples == 2 and info.reject_reasons == {"bad_json": 1, "undecodable_image": 1, "missing_image": 1,
                                                         "missing_mask": 1, "unknown_mask_kind": 1}
    assert info.labelled == info.rows and info.unlabelled_by_kind == {}
    rejects = parts.read_rejects(BankRef(bank), name)
    assert sorted(zip(rejects["key"].to_pylist(), rejects["reason"].to_pylist())) == [
        ("bad-image", "undecodable_image"), ("bad-json", "bad_json"), ("no-image", "missing_image"),
        ("no-mask", "missing_mask"), ("unnamed-mask", "unknown_mask_kind")]


def test_timm_encoder_on_unmasked_images_gives_unlabelled_superpixel_segments(corpus, tmp_path):
    root, summary = corpus
    config = tiny_config(str(root / "train-000000.tar"), str(tmp_path / "bank"), mask_kind="none")
    config = type(config)(**{**vars(config), "encoder": type(config.encoder)(name="tiny-dino", weights="untrained")})
    report = build_bank(config)
    assert report.ok and report.samples == 6
    table = read_bank(str(tmp_path / "bank"))
    assert table.num_rows > 6  # several superpixels per image
    assert set(table["label_source"].to_pylist()) == {"none"} and set(table["label"].to_pylist()) == {None}
    assert set(table["mask_kind"].to_pylist()) == {"superpixel"}
    assert (report.labelled, report.unlabelled_by_kind) == (0, {"superpixel": table.num_rows})
    assert all(table["text_embedding"].is_null().to_pylist())  # DINOv2-style encoders have no text tower
    dims = read_manifest(BankRef(str(tmp_path / "bank"))).dims
    assert table.schema.field("visual_embedding").type.list_size == dims["visual"]
