"""The bank format layer: parts, commit markers, manifests, CURRENT, names and index objects (no Ray)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from bank_builder.format import (
    BankFormatError, BankMismatchError, BankRef, ConcurrentUpdateError, IndexCorruptError, Manifest, PartEntry,
    UnsafeNameError, current_version, index_layout, list_versions, make_manifest, parts, publish, read_current,
    read_manifest, storage, versions,
)
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


def _info(name: str = "p", ordinal: int = 3) -> PartEntry:
    return PartEntry(name, ordinal, "file:///x/train-000003.tar", 0, 0, "", 0, 0, {}, "fp")


def test_segment_ids_encode_part_and_row():
    for ordinal, row in [(0, 0), (3, 17), (2**31 - 1, 2**32 - 1)]:
        sid = parts.segment_id(ordinal, row)
        assert parts.split_segment_id(sid) == (ordinal, row)
        assert sid < 2**63
    assert parts.segment_id(1, 0) > parts.segment_id(0, 2**32 - 1)


def test_part_names_are_stable_readable_and_distinct():
    a = parts.part_name("s3://bucket/corpus/train-000003.tar", 3, "fp012345678")
    assert a == parts.part_name("s3://bucket/corpus/train-000003.tar", 3, "fp012345678")
    assert a.startswith("train-000003-") and a.endswith("-o3-fp012345")
    assert a != parts.part_name("s3://bucket/other/train-000003.tar", 3, "fp012345678")
    # Another ordinal or fingerprint makes another object: a listed part is never rewritten with other bytes.
    assert a != parts.part_name("s3://bucket/corpus/train-000003.tar", 4, "fp012345678")
    assert a != parts.part_name("s3://bucket/corpus/train-000003.tar", 3, "other-fp")
    assert parts.part_name("/data/shard 1.tar.gz", 0, "f").startswith("shard_1-")


def test_part_round_trip(tmp_path):
    ref = BankRef(str(tmp_path / "bank"))
    rows = parts.SegmentRows()
    rows.add("k0", _segments(3))
    rng = np.random.default_rng(0)
    visual = rng.standard_normal((3, 5)).astype(np.float16)
    text = [np.ones(4, np.float16), None, np.full(4, 0.5, np.float16)]
    table = parts.part_table("p", 3, rows, visual, np.array([0.1, 0.2, 0.3]), text, 4)
    info = parts.write_part(ref, table, _info(), {"name": "enc"})

    data = open(parts.part_url(ref, "p"), "rb").read()
    assert info.bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    assert parts.read_commit(ref, "p") == info
    back = parts.read_part(ref, "p")
    assert back["segment_id"].to_pylist() == [parts.segment_id(3, r) for r in range(3)]
    assert back.schema.field("visual_embedding").type.value_type == "halffloat"
    np.testing.assert_array_equal(np.stack(back["visual_embedding"].to_numpy(zero_copy_only=False)), visual)
    assert back["text_embedding"].is_null().to_pylist() == [False, True, False]
    assert back["label"].to_pylist() == ["class0", None, "class2"]
    assert back["label_source"].to_pylist() == ["ground_truth", "none", "ground_truth"]
    assert back["mask_kind"].to_pylist() == ["instance", "superpixel", "instance"]
    assert back["bbox"].to_pylist()[2] == [0, 2, 3, 3]
    assert back["mask"].to_pylist()[1] == {"size": [8, 8], "counts": "c1"}
    meta = json.loads(pq.read_schema(parts.part_url(ref, "p")).metadata[b"refbank"])
    assert meta["encoder"] == {"name": "enc"} and meta["ordinal"] == 3 and meta["fingerprint"] == "fp"
    np.testing.assert_array_equal(parts.read_rows(ref, "p", np.array([0, 2])), visual[[0, 2]])


def test_uncommitted_part_is_not_done(tmp_path):
    ref = BankRef(str(tmp_path))
    storage.write_bytes(parts.part_url(ref, "p"), b"half a part")
    assert parts.read_commit(ref, "p") is None


def test_atomic_local_write_leaves_no_temp_files(tmp_path):
    url = str(tmp_path / "a" / "b.json")
    storage.write_json(url, {"x": 1}, {})
    storage.write_json(url, {"x": 2}, {})
    assert storage.read_json(url, {}) == {"x": 2}
    assert os.listdir(tmp_path / "a") == ["b.json"]


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "s3://other/x", "a//b", "", ".", "a b",
                                  "..", "parts/../../../etc/passwd"])
def test_object_names_cannot_leave_the_bank(tmp_path, name):
    with pytest.raises(UnsafeNameError, match="does not stay inside the bank"):
        BankRef(str(tmp_path)).url("parts", name)


def test_safe_names_resolve_under_the_bank(tmp_path):
    ref = BankRef(str(tmp_path) + "/")
    assert ref.url("index", "20260101T000000Z-abc123", "lists/000001.bin") == \
        f"{tmp_path}/index/20260101T000000Z-abc123/lists/000001.bin"
    assert BankRef("s3://bucket/banks/b", {"anon": True}) == BankRef("s3://bucket/banks/b")  # options: not identity


def _publish_next(ref: BankRef, entries: list[PartEntry], spec: dict) -> str:
    return publish(ref, make_manifest(entries, spec, "fp", {}), read_current(ref))


def test_publish_versions_and_current(tmp_path):
    ref = BankRef(str(tmp_path))
    assert current_version(ref) is None and read_manifest(ref) is None
    p = _info()
    p.rows, p.samples, p.rejects, p.reject_reasons = 5, 2, 1, {"bad_json": 1}
    spec = {"visual_dim": 5, "text_dim": 4}
    v1 = _publish_next(ref, [p], spec)
    v2 = _publish_next(ref, [p], spec)
    assert (v1, v2) == ("v000001", "v000002")
    assert current_version(ref) == "v000002"
    m = read_manifest(ref)
    assert m.version == "v000002" and m.parent == "v000001" and m.parts == [p]
    assert m.totals == {"parts": 1, "segments": 5, "samples": 2, "rejects": 1, "reject_reasons": {"bad_json": 1}}
    assert read_manifest(ref, "v000001").version == "v000001"
    assert list_versions(ref) == ["v000001", "v000002"]
    record = versions.published_record(ref, "v000002")
    assert record["parent"] == "v000001" and record["version"] == "v000002"
    with pytest.raises(BankMismatchError, match="no version"):
        read_manifest(ref, "v000009")


@pytest.fixture(params=["local", "s3"])
def any_bank(request, tmp_path):
    """A BankRef to a local folder, or to a prefix in a fresh bucket on the moto S3 server."""
    if request.param == "local":
        return BankRef(str(tmp_path / "bank"))
    options, bucket = request.getfixturevalue("s3")
    return BankRef(f"s3://{bucket}/banks/b", options)


def test_a_publish_from_a_stale_current_is_refused_and_leaves_no_visible_version(any_bank):
    ref = any_bank
    spec = {"visual_dim": 5, "text_dim": 4}

    def publish_names(names: list[str], current) -> str:
        return publish(ref, make_manifest([_info(n, i) for i, n in enumerate(names)], spec, "fp", {}), current)

    publish_names(["a"], read_current(ref))
    stale = read_current(ref)  # both writers plan from v000001
    assert publish_names(["a", "b"], stale) == "v000002"
    with pytest.raises(ConcurrentUpdateError, match="CURRENT moved from v000001 to v000002"):
        publish_names(["a", "c"], stale)
    # The winner's version is intact and live; the loser's manifest is gone; nothing lists a third version.
    assert current_version(ref) == "v000002"
    assert [p.name for p in read_manifest(ref).parts] == ["a", "b"]
    assert list_versions(ref) == ["v000001", "v000002"]
    assert not storage.exists(versions.manifest_url(ref, "v000003"), ref.storage_options)
    # The next writer that planned from v000002 publishes after it.
    assert publish_names(["a"], read_current(ref)) == "v000003"


def test_conditional_create_never_overwrites(any_bank):
    url, so = any_bank.url("x"), any_bank.storage_options
    storage.write_if_absent(url, b"first", so)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if_absent(url, b"second", so)
    assert storage.read_bytes(url, so) == b"first"


def test_an_orphan_manifest_is_never_listed_nor_reused(tmp_path):
    ref = BankRef(str(tmp_path))
    spec = {"visual_dim": 5, "text_dim": None}
    _publish_next(ref, [_info()], spec)
    # A writer that died between its manifest and the swap of CURRENT left v000002 behind.
    storage.write_json(versions.manifest_url(ref, "v000002"), read_manifest(ref).to_dict())
    assert list_versions(ref) == ["v000001"]
    assert _publish_next(ref, [_info()], spec) == "v000003"  # a fresh name: the orphan is never overwritten
    assert read_manifest(ref).parent == "v000001"
    assert list_versions(ref) == ["v000001", "v000003"]


@pytest.mark.parametrize("content", [b"\x89\xff\x00garbage", b"../../etc/passwd\n", b""])
def test_a_current_that_names_no_version_says_so(tmp_path, content):
    (tmp_path / "CURRENT").write_bytes(content)
    with pytest.raises(BankFormatError, match="CURRENT does not name a version"):
        current_version(BankRef(str(tmp_path)))


def test_a_part_object_is_never_overwritten(tmp_path):
    ref = BankRef(str(tmp_path / "bank"))
    rows = parts.SegmentRows()
    rows.add("k0", _segments(2))
    visual = np.ones((2, 5), np.float16)
    table = parts.part_table("p", 3, rows, visual, np.zeros(2), [None, None], None)
    first = parts.write_part(ref, table, _info(), {"name": "enc"})
    before = open(parts.part_url(ref, "p"), "rb").read()
    # The same part again (a run that died before its marker, re-run): the object on storage is adopted.
    again = parts.write_part(ref, table.slice(0, 1), _info(), {"name": "enc"})
    assert open(parts.part_url(ref, "p"), "rb").read() == before and again.sha256 == first.sha256
    # Another part under the same name is refused, and the object stays as it was.
    other = PartEntry("p", 4, "file:///x/other.tar", 0, 0, "", 0, 0, {}, "fp")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        parts.write_part(ref, table, other, {"name": "enc"})
    assert open(parts.part_url(ref, "p"), "rb").read() == before


def _publish_raw(ref: BankRef, manifest: dict) -> None:
    """Publish a manifest as raw JSON, the way a tampered or foreign bank would hold it."""
    storage.write_json(versions.manifest_url(ref, "v000001"), manifest)
    storage.write_bytes(ref.url("CURRENT"), b"v000001\n")


def test_other_format_version_is_refused(tmp_path):
    ref = BankRef(str(tmp_path))
    _publish_raw(ref, {**make_manifest([], {"visual_dim": 5, "text_dim": None}, "fp", {}).to_dict(),
                       "format_version": 999})
    with pytest.raises(BankFormatError, match="format 999"):
        read_manifest(ref)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("parts"), "has no 'parts'"),
    (lambda m: m.update(parts="nope"), "parts must be a list"),
    (lambda m: m["parts"][0].update(rows=-3), "rows must be a count"),
    (lambda m: m["parts"][0].update(name="../../../../etc/passwd"), "does not stay inside the bank"),
    (lambda m: m["parts"][0].update(name="/etc/passwd"), "does not stay inside the bank"),
    (lambda m: m.update(dims=[]), "dims must be objects"),
])
def test_a_malformed_or_hostile_manifest_is_refused_with_what_is_wrong(tmp_path, change, message):
    ref = BankRef(str(tmp_path))
    raw = make_manifest([_info()], {"visual_dim": 5, "text_dim": None}, "fp", {}).to_dict()
    change(raw)
    _publish_raw(ref, raw)
    with pytest.raises(BankFormatError, match=message):
        read_manifest(ref)


def test_manifest_round_trips_through_json(tmp_path):
    m = make_manifest([_info("a", 0), _info("b", 1)], {"visual_dim": 5, "text_dim": 4}, "fp", {"x": [1]})
    again = Manifest.parse(json.loads(json.dumps(m.to_dict())), "test")
    assert again == m


# ----------------------------------------------------------------------------------------- index objects


def test_list_layout_round_trip():
    layout = index_layout.ListLayout(code_size=4, dim=3, refine=True)
    ids = np.array([7, 8], np.int64)
    codes = np.arange(8, dtype=np.uint8).reshape(2, 4)
    vectors = np.arange(6, dtype=np.float16).reshape(2, 3)
    data = layout.encode(ids, codes, vectors)
    assert len(data) == 2 * layout.row_bytes == 2 * (8 + 4 + 6)
    back = layout.decode(data, 2)
    np.testing.assert_array_equal(back.ids, ids)
    np.testing.assert_array_equal(back.codes, codes)
    np.testing.assert_array_equal(back.vectors, vectors)
    with pytest.raises(IndexCorruptError, match="takes 36 bytes"):
        layout.decode(data[:-1], 2)
