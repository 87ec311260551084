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
                bbox=(0, i, i + 1, i + 1), area=i + 1, rle={"size": [8, 8], "counts": f"c{i}"},
                mask_kind="superpixel" if i == 1 else "instance")
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
    a = store.part_name("s3://bucket/corpus/train-000003.tar")
    assert a == store.part_name("s3://bucket/corpus/train-000003.tar")
    assert a.startswith("train-000003-")
    assert a != store.part_name("s3://bucket/other/train-000003.tar")
    assert store.part_name("/data/shard 1.tar.gz").startswith("shard_1-")


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
    assert back["mask_kind"].to_pylist() == ["instance", "superpixel", "instance"]
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


def test_publish_versions_and_current(tmp_path):
    bank = str(tmp_path)
    assert manifest.current_version(bank) is None and manifest.read_manifest(bank) is None
    p = _info()
    p.rows, p.samples, p.rejects, p.reject_reasons = 5, 2, 1, {"bad_json": 1}
    spec = {"visual_dim": 5, "text_dim": 4}
    v1 = manifest.publish(bank, manifest.make_manifest([p], spec, "fp", {}))
    v2 = manifest.publish(bank, manifest.make_manifest([p], spec, "fp", {}))
    assert (v1, v2) == ("v000001", "v000002")
    assert manifest.current_version(bank) == "v000002"
    m = manifest.read_manifest(bank)
    assert m["version"] == "v000002" and m["parent"] == "v000001"
    assert m["totals"] == {"parts": 1, "segments": 5, "samples": 2, "rejects": 1, "reject_reasons": {"bad_json": 1}}
    assert manifest.read_manifest(bank, "v000001")["version"] == "v000001"
    with pytest.raises(manifest.BankMismatchError, match="no version"):
        manifest.read_manifest(bank, "v000009")


def test_other_format_version_is_refused(tmp_path):
    bank = str(tmp_path)
    m = manifest.make_manifest([], {"visual_dim": 5, "text_dim": None}, "fp", {})
    manifest.publish(bank, {**m, "format_version": 999})
    with pytest.raises(manifest.BankMismatchError, match="format 999"):
        manifest.read_manifest(bank)
