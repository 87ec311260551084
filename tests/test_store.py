"""Parts, commit markers, manifests and CURRENT on local storage (no Ray)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from bank_builder import manifest, storage, store
from bank_builder.records import LabelSource, Segment


def _segments(n: int) -> list[Segment]:
    masks = [np.zeros((8, 8), bool) for _ in range(n)]
    for i, m in enumerate(masks):
        m[i, : i + 1] = True
    return [
        Segment(index=i, mask=m, label=None if i == 1 else f"class{i}",
                label_source=LabelSource.NONE if i == 1 else LabelSource.GROUND_TRUTH,
                bbox=(0, i, i + 1, i + 1), area=i + 1, rle={"size": [8, 8], "counts": f"c{i}"})
        for i, m in enumerate(masks)
    ]


def _info(name: str = "p", ordinal: int = 3) -> store.PartInfo:
    return store.PartInfo(name, ordinal, "file:///x/train-000003.tar", 0, 0, "", 0, 0, {}, "fp")


def test_segment_ids_encode_part_and_row():
    for ordinal, row in [(0, 0), (3, 17), (2**31 - 1, 2**32 - 1)]:
        sid = store.segment_id(ordinal, row)
        assert store.split_segment_id(sid) == (ordinal, row)
        assert sid < 2**63
    assert store.segment_id(1, 0) > store.segment_id(0, 2**32 - 1)


def test_part_names_are_stable_readable_and_distinct():
    a = store.part_name("s3://bucket/corpus/train-000003.tar", 3, "fp012345678")
    assert a == store.part_name("s3://bucket/corpus/train-000003.tar", 3, "fp012345678")
    assert a.startswith("train-000003-") and a.endswith("-o3-fp012345")
    assert a != store.part_name("s3://bucket/other/train-000003.tar", 3, "fp012345678")
    # Another ordinal or fingerprint makes another object: a listed part is never rewritten with other bytes.
    assert a != store.part_name("s3://bucket/corpus/train-000003.tar", 4, "fp012345678")
    assert a != store.part_name("s3://bucket/corpus/train-000003.tar", 3, "other-fp")
    assert store.part_name("/data/shard 1.tar.gz", 0, "f").startswith("shard_1-")


def test_part_round_trip(tmp_path):
    bank = str(tmp_path / "bank")
    rows = store.SegmentRows()
    rows.add("k0", _segments(3))
    rng = np.random.default_rng(0)
    visual = rng.standard_normal((3, 5)).astype(np.float16)
    text = [np.ones(4, np.float16), None, np.full(4, 0.5, np.float16)]
    table = store.part_table("p", 3, rows, visual, np.array([0.1, 0.2, 0.3]), text, 4)
    info = store.write_part(bank, table, _info(), {"name": "enc"}, {})

    data = open(store.part_url(bank, "p"), "rb").read()
    assert info.bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    assert store.read_commit(bank, "p", {}) == info
    back = store.read_part(bank, "p")
    assert back["segment_id"].to_pylist() == [store.segment_id(3, r) for r in range(3)]
    assert back.schema.field("visual_embedding").type.value_type == "halffloat"
    np.testing.assert_array_equal(np.stack(back["visual_embedding"].to_numpy(zero_copy_only=False)), visual)
    assert back["text_embedding"].is_null().to_pylist() == [False, True, False]
    assert back["label"].to_pylist() == ["class0", None, "class2"]
    assert back["label_source"].to_pylist() == ["ground_truth", "none", "ground_truth"]
    assert back["bbox"].to_pylist()[2] == [0, 2, 3, 3]
    assert back["mask"].to_pylist()[1] == {"size": [8, 8], "counts": "c1"}
    meta = json.loads(pq.read_schema(store.part_url(bank, "p")).metadata[b"refbank"])
    assert meta["encoder"] == {"name": "enc"} and meta["ordinal"] == 3 and meta["fingerprint"] == "fp"


def test_uncommitted_part_is_not_done(tmp_path):
    bank = str(tmp_path)
    storage.write_bytes(store.part_url(bank, "p"), b"half a part", {})
    assert store.read_commit(bank, "p", {}) is None


def test_atomic_local_write_leaves_no_temp_files(tmp_path):
    url = str(tmp_path / "a" / "b.json")
    storage.write_json(url, {"x": 1}, {})
    storage.write_json(url, {"x": 2}, {})
    assert storage.read_json(url, {}) == {"x": 2}
    assert os.listdir(tmp_path / "a") == ["b.json"]


def _publish_next(bank: str, parts: list[store.PartInfo], spec: dict) -> str:
    return manifest.publish(bank, manifest.make_manifest(parts, spec, "fp", {}), manifest.read_current(bank))


def test_publish_versions_and_current(tmp_path):
    bank = str(tmp_path)
    assert manifest.current_version(bank) is None and manifest.read_manifest(bank) is None
    p = _info()
    p.rows, p.samples, p.rejects, p.reject_reasons = 5, 2, 1, {"bad_json": 1}
    spec = {"visual_dim": 5, "text_dim": 4}
    v1 = _publish_next(bank, [p], spec)
    v2 = _publish_next(bank, [p], spec)
    assert (v1, v2) == ("v000001", "v000002")
    assert manifest.current_version(bank) == "v000002"
    m = manifest.read_manifest(bank)
    assert m["version"] == "v000002" and m["parent"] == "v000001"
    assert m["totals"] == {"parts": 1, "segments": 5, "samples": 2, "rejects": 1, "reject_reasons": {"bad_json": 1}}
    assert manifest.read_manifest(bank, "v000001")["version"] == "v000001"
    assert manifest.list_versions(bank) == ["v000001", "v000002"]
    record = storage.read_json(manifest.published_url(bank, "v000002"))
    assert record["parent"] == "v000001" and record["version"] == "v000002"
    with pytest.raises(manifest.BankMismatchError, match="no version"):
        manifest.read_manifest(bank, "v000009")


@pytest.fixture(params=["local", "s3"])
def any_bank(request, tmp_path):
    """(bank URI, storage options): a local folder, or a prefix in a fresh bucket on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "bank"), {}
    options, bucket = request.getfixturevalue("s3")
    return f"s3://{bucket}/banks/b", options


def test_a_publish_from_a_stale_current_is_refused_and_leaves_no_visible_version(any_bank):
    bank, so = any_bank
    spec = {"visual_dim": 5, "text_dim": 4}

    def publish(names: list[str], current: manifest.Current) -> str:
        parts = [_info(n, i) for i, n in enumerate(names)]
        return manifest.publish(bank, manifest.make_manifest(parts, spec, "fp", {}), current, so)

    publish(["a"], manifest.read_current(bank, so))
    stale = manifest.read_current(bank, so)  # both writers plan from v000001
    assert publish(["a", "b"], stale) == "v000002"
    with pytest.raises(manifest.ConcurrentUpdateError, match="CURRENT moved from v000001 to v000002"):
        publish(["a", "c"], stale)
    # The winner's version is intact and live; the loser's manifest is gone; nothing lists a third version.
    assert manifest.current_version(bank, so) == "v000002"
    assert [p["name"] for p in manifest.read_manifest(bank, storage_options=so)["parts"]] == ["a", "b"]
    assert manifest.list_versions(bank, so) == ["v000001", "v000002"]
    assert not storage.exists(manifest.manifest_url(bank, "v000003"), so)
    # The next writer that planned from v000002 publishes after it.
    assert publish(["a"], manifest.read_current(bank, so)) == "v000003"


def test_conditional_create_never_overwrites(any_bank):
    bank, so = any_bank
    url = storage.join(bank, "x")
    storage.write_if_absent(url, b"first", so)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if_absent(url, b"second", so)
    assert storage.read_bytes(url, so) == b"first"


def test_an_orphan_manifest_is_never_listed_nor_reused(tmp_path):
    bank = str(tmp_path)
    spec = {"visual_dim": 5, "text_dim": None}
    _publish_next(bank, [_info()], spec)
    # A writer that died between its manifest and the swap of CURRENT left v000002 behind.
    storage.write_json(manifest.manifest_url(bank, "v000002"), {"format_version": store.FORMAT_VERSION})
    assert manifest.list_versions(bank) == ["v000001"]
    assert _publish_next(bank, [_info()], spec) == "v000003"  # a fresh name: the orphan is never overwritten
    assert manifest.read_manifest(bank)["parent"] == "v000001"
    assert manifest.list_versions(bank) == ["v000001", "v000003"]


@pytest.mark.parametrize("content", [b"\x89\xff\x00garbage", b"../../etc/passwd\n", b""])
def test_a_current_that_names_no_version_says_so(tmp_path, content):
    (tmp_path / "CURRENT").write_bytes(content)
    with pytest.raises(manifest.BankMismatchError, match="CURRENT does not name a version"):
        manifest.current_version(str(tmp_path))


def test_a_part_object_is_never_overwritten(tmp_path):
    bank = str(tmp_path / "bank")
    rows = store.SegmentRows()
    rows.add("k0", _segments(2))
    visual = np.ones((2, 5), np.float16)
    table = store.part_table("p", 3, rows, visual, np.zeros(2), [None, None], None)
    first = store.write_part(bank, table, _info(), {"name": "enc"}, {})
    before = open(store.part_url(bank, "p"), "rb").read()
    # The same part again (a run that died before its marker, re-run): the object on storage is adopted.
    again = store.write_part(bank, table.slice(0, 1), _info(), {"name": "enc"}, {})
    assert open(store.part_url(bank, "p"), "rb").read() == before and again.sha256 == first.sha256
    # Another part under the same name is refused, and the object stays as it was.
    other = store.PartInfo("p", 4, "file:///x/other.tar", 0, 0, "", 0, 0, {}, "fp")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        store.write_part(bank, table, other, {"name": "enc"}, {})
    assert open(store.part_url(bank, "p"), "rb").read() == before


def test_other_format_version_is_refused(tmp_path):
    bank = str(tmp_path)
    m = manifest.make_manifest([], {"visual_dim": 5, "text_dim": None}, "fp", {})
    manifest.publish(bank, {**m, "format_version": 999}, manifest.read_current(bank))
    with pytest.raises(manifest.BankMismatchError, match="format 999"):
        manifest.read_manifest(bank)
