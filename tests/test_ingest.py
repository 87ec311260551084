"""Ingest stage: shard listing (local and moto S3), streaming decode, and every reject reason."""

from __future__ import annotations

import numpy as np
import pytest
import s3fs
from PIL import Image
from tar_helpers import Members, as_json, data_offset, encode, rgb, tar_bytes, write

from bank_builder.config import MASK_PROBE_SAMPLES, IngestConfig, MaskKind
from bank_builder.ingest import ShardReadError, iter_samples, list_shards
from bank_builder.records import Reject, RejectReason, Sample

SMALL = IngestConfig(max_image_pixels=100)  # good samples are 8x10 = 80 px


def instance_mask(seed: int, height: int = 8, width: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, (height, width), dtype=np.uint8)


def good(key: str, seed: int) -> Members:
    """A valid sample: png image, instance mask, rle.json, json."""
    rle = [{"segmentation": {"size": [8, 10], "counts": [5, 10, 65]}, "label": "thing"}]
    return [
        (f"{key}.png", encode(rgb(seed))),
        (f"{key}.mask.png", encode(instance_mask(seed))),
        (f"{key}.rle.json", as_json(rle)),
        (f"{key}.json", as_json({"caption": f"sample {seed}", "segments": [{"id": 1, "label": "cat"}]})),
    ]


def assert_good(item: Sample | Reject, key: str, seed: int, index: int, shard: str) -> None:
    assert isinstance(item, Sample), item
    assert (item.shard, item.key, item.index) == (shard, key, index)
    assert item.image.dtype == np.uint8 and np.array_equal(item.image, rgb(seed))
    assert item.mask.dtype == np.uint8 and np.array_equal(item.mask, instance_mask(seed))
    assert item.annotations is None
    assert item.meta["caption"] == f"sample {seed}"


# ----------------------------------------------------------------------------------------- listing


def test_list_shards_local_braces_globs_and_mixes(tmp_path, monkeypatch):
    for i in range(10):
        write(tmp_path / f"train-{i:03d}.tar", b"x")
    write(tmp_path / "val-000.tar", b"x")
    write(tmp_path / "notes.txt", b"x")
    (tmp_path / "train-999.tar").mkdir()  # a folder that matches the glob is not a shard
    train = [str(tmp_path / f"train-{i:03d}.tar") for i in range(10)]

    assert list_shards(f"{tmp_path}/train-{{000..002}}.tar") == train[:3]  # few names: checked one by one
    assert list_shards(f"{tmp_path}/train-{{009..000}}.tar") == train  # many names: one listing; sorted
    assert list_shards(f"{tmp_path}/train-*.tar") == train
    assert list_shards(f"{tmp_path}/{{train,val}}-00[0-1].tar") == [*train[:2], str(tmp_path / "val-000.tar")]
    assert list_shards(f"{tmp_path}/{{train-000.tar,train-00?.tar,train-{{000,001}}.tar}}") == train
    assert list_shards(f"file://{tmp_path}/val-*.tar") == [f"file://{tmp_path}/val-000.tar"]
    monkeypatch.chdir(tmp_path)
    assert list_shards("train-00{0,1}.tar") == train[:2]  # relative pattern → absolute paths


def test_list_shards_errors(tmp_path):
    write(tmp_path / "train-000.tar", b"x")
    with pytest.raises(ValueError, match=r"no shard matches .*nothing-\*\.tar"):
        list_shards(f"{tmp_path}/nothing-*.tar")
    with pytest.raises(ValueError, match="no shard matches"):
        list_shards(f"{tmp_path}/missing-dir/train-{{000..019}}.tar")
    with pytest.raises(ValueError, match=r"2 of the shards named .* \(first: .*train-001\.tar\)"):
        list_shards(f"{tmp_path}/train-{{000..002}}.tar")


def test_list_shards_s3(s3):
    options, bucket = s3
    fs = s3fs.S3FileSystem(**options)
    for i in range(10):
        fs.pipe(f"{bucket}/shards/train-{i:03d}.tar", b"x")
    fs.pipe(f"{bucket}/other/extra-001.tar", b"x")
    train = [f"s3://{bucket}/shards/train-{i:03d}.tar" for i in range(10)]

    assert list_shards(f"s3://{bucket}/shards/train-{{000..009}}.tar", options) == train
    assert list_shards(f"s3://{bucket}/shards/train-{{000..001}}.tar", options) == train[:2]
    assert list_shards(f"s3://{bucket}/shards/*.tar", options) == train
    mixed = list_shards(f"s3://{bucket}/{{shards,other}}/*-00[01].tar", options)
    assert mixed == sorted([f"s3://{bucket}/other/extra-001.tar", *train[:2]])
    with pytest.raises(ValueError, match="no shard matches"):
        list_shards(f"s3://{bucket}/nope/*.tar", options)


# ----------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_iter_samples_reads_local_shards(tmp_path, gz):
    keys = [f"dir/train-000001-{i:06d}" for i in range(3)]
    members = [m for i, key in enumerate(keys) for m in good(key, i)]
    shard = write(tmp_path / ("s.tar.gz" if gz else "s.tar"), tar_bytes(members, gz=gz))

    items = list(iter_samples(shard, IngestConfig()))

    assert len(items) == 3
    for i, (item, key) in enumerate(zip(items, keys)):
        assert_good(item, key, i, i, shard)
        assert item.meta["segments"] == [{"id": 1, "label": "cat"}]


def test_iter_samples_reads_s3(s3):
    options, bucket = s3
    url = f"s3://{bucket}/shards/train-000.tar"
    s3fs.S3FileSystem(**options).pipe(url, tar_bytes(good("a", 1) + good("b", 2)))

    [shard] = list_shards(f"s3://{bucket}/shards/*.tar", options)
    items = list(iter_samples(shard, IngestConfig(), options))

    assert shard == url
    assert_good(items[0], "a", 1, 0, url)
    assert_good(items[1], "b", 2, 1, url)


def test_mask_kinds_and_optional_masks(tmp_path):
    depth16 = (np.arange(80, dtype=np.uint16).reshape(8, 10) * 800).astype(np.uint16)  # up to 63200
    members = [("a.png", encode(rgb(0))), ("a.mask.png", encode(depth16)), *good("b", 1)]
    members += [("c.jpg", encode(rgb(2), "JPEG"))]
    shard = write(tmp_path / "s.tar", tar_bytes(members))

    a, b, c = iter_samples(shard, IngestConfig(mask_kind=MaskKind.INSTANCE, on_missing_mask="superpixels"))
    assert a.mask.dtype == np.uint16 and np.array_equal(a.mask, depth16) and a.meta == {}
    assert a.mask_kind is b.mask_kind is MaskKind.INSTANCE
    assert c.mask is None and c.mask_kind is None and c.image.shape == (8, 10, 3)  # superpixels later
    none_kind = list(iter_samples(shard, IngestConfig(mask_kind=MaskKind.NONE)))
    assert [(s.mask, s.mask_kind) for s in none_kind] == [(None, None)] * 3
    rle_kind = list(iter_samples(shard, IngestConfig(mask_kind=MaskKind.RLE, on_missing_mask="superpixels")))
    assert [s.annotations is None for s in rle_kind] == [True, False, True]
    assert [s.mask_kind for s in rle_kind] == [None, MaskKind.RLE, None]
    assert rle_kind[1].annotations[0]["label"] == "thing" and rle_kind[1].mask is None


def _auto_sample(key: str, mask: bytes | None = None, rle: list | None = None, meta: dict | None = None) -> Members:
    members = [(f"{key}.png", encode(rgb(0)))]
    members += [(f"{key}.mask.png", mask)] if mask is not None else []
    members += [(f"{key}.rle.json", as_json(rle))] if rle is not None else []
    return members + ([(f"{key}.json", as_json(meta))] if meta is not None else [])


def test_auto_reads_each_sample_by_what_it_holds(tmp_path):
    mask = encode(instance_mask(0))
    rle = [{"segmentation": {"size": [8, 10], "counts": [5, 10, 65]}}]
    table = {"0": "road", "1": "sky"}
    members = [
        *_auto_sample("inst", mask, meta={"segments": [{"id": 1, "label": "cat"}], "classes": table}),
        *_auto_sample("cls", mask, meta={"classes": table}),
        *_auto_sample("bin", mask, meta={"label": "dog", "classes": table}),  # label wins over a class table
        *_auto_sample("rle", rle=rle, meta={"caption": "x"}),
        *_auto_sample("both", mask, rle=rle, meta={"classes": table}),  # a mask.png that names its kind wins
        *_auto_sample("unnamed", mask, rle=rle),  # a mask.png without json keys: the rle.json is used
        *_auto_sample("odd", mask, meta={"classes": ["road"]}),  # `classes` of the wrong type names nothing
        *_auto_sample("bare"),
    ]
    shard = write(tmp_path / "s.tar", tar_bytes(members))

    items = {item.key: item for item in iter_samples(shard, IngestConfig())}

    kinds = {key: item.mask_kind for key, item in items.items() if isinstance(item, Sample)}
    assert kinds == {"inst": MaskKind.INSTANCE, "cls": MaskKind.CLASS, "bin": MaskKind.BINARY,
                     "rle": MaskKind.RLE, "both": MaskKind.CLASS, "unnamed": MaskKind.RLE}
    assert items["both"].annotations is None and items["unnamed"].mask is None
    # a shard with masks rejects the samples that have none usable, saying why and what to do
    assert (items["odd"].reason, items["bare"].reason) == (RejectReason.UNKNOWN_MASK_KIND, RejectReason.MISSING_MASK)
    assert "`segments`" in items["odd"].detail and "--on-missing-mask superpixels" in items["bare"].detail
    relaxed = {i.key: i for i in iter_samples(shard, IngestConfig(on_missing_mask="superpixels"))}
    assert all(isinstance(relaxed[k], Sample) and relaxed[k].mask_kind is None for k in ("odd", "bare"))


def test_a_shard_without_masks_gets_superpixels_and_one_with_masks_rejects(tmp_path):
    """auto: the first MASK_PROBE_SAMPLES samples of a shard tell whether it has masks."""
    bare = [m for i in range(MASK_PROBE_SAMPLES + 2) for m in _auto_sample(f"k{i:02d}")]  # one member each
    late = _auto_sample("m", encode(instance_mask(0)), meta={"segments": []})  # the probe's last sample
    mask_free = write(tmp_path / "free.tar", tar_bytes(bare))
    masked = write(tmp_path / "masked.tar", tar_bytes(bare[: MASK_PROBE_SAMPLES - 1] + late + bare[-2:]))

    free_items = list(iter_samples(mask_free, IngestConfig()))
    masked_items = list(iter_samples(masked, IngestConfig()))

    assert [i.index for i in free_items] == list(range(MASK_PROBE_SAMPLES + 2))
    assert all(isinstance(i, Sample) and i.mask_kind is None for i in free_items)
    assert [i.key for i in masked_items] == [f"k{i:02d}" for i in range(MASK_PROBE_SAMPLES - 1)] + ["m"] + [
        f"k{i:02d}" for i in range(MASK_PROBE_SAMPLES, MASK_PROBE_SAMPLES + 2)]
    assert [type(i).__name__ for i in masked_items] == ["Reject"] * (MASK_PROBE_SAMPLES - 1) + ["Sample"] + ["Reject"] * 2
    assert masked_items[MASK_PROBE_SAMPLES - 1].index == MASK_PROBE_SAMPLES - 1
    assert {i.reason for i in masked_items if isinstance(i, Reject)} == {RejectReason.MISSING_MASK}
    # a format named on the command line says the corpus has masks, whatever a shard starts with
    assert all(isinstance(i, Reject) for i in iter_samples(mask_free, IngestConfig(mask_kind=MaskKind.CLASS)))
    with pytest.raises(ValueError, match="drop one"):
        IngestConfig(mask_kind="none", on_missing_mask="reject")


def test_a_cut_inside_the_probe_still_yields_what_came_before(tmp_path):
    data = tar_bytes([m for i in range(4) for m in _auto_sample(f"k{i}")])
    shard = write(tmp_path / "s.tar", data[: data_offset(data, "k3.png") + 10])
    items = list(iter_samples(shard, IngestConfig()))
    assert [type(i).__name__ for i in items] == ["Sample"] * 3 + ["Reject"]
    assert items[-1].reason is RejectReason.TRUNCATED_MEMBER and items[-1].key == "k3"


def _mode_image(mode: str) -> tuple[Image.Image, np.ndarray]:
    """A PIL image in `mode` and the RGB array ingest must produce from it."""
    base = rgb(5)
    if mode == "I;16":
        grey = np.arange(80, dtype=np.uint16).reshape(8, 10) * 800
        return Image.fromarray(grey), np.repeat((grey >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    image = Image.fromarray(base).convert(mode)
    return image, np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16"])
def test_image_modes_become_rgb_uint8(tmp_path, mode):
    image, expected = _mode_image(mode)
    shard = write(tmp_path / "s.tar", tar_bytes([("a.png", encode(image))]))
    [sample] = iter_samples(shard, IngestConfig(mask_kind=MaskKind.NONE))
    assert sample.image.dtype == np.uint8 and sample.image.shape == (8, 10, 3)
    assert np.array_equal(sample.image, expected)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    shard = write(tmp_path / "s.tar", tar_bytes([("a.jpg", encode(rgb(3), "JPEG", mode="CMYK"))]))
    [sample] = iter_samples(shard, IngestConfig(mask_kind=MaskKind.NONE))
    assert sample.image.shape == (8, 10, 3) and np.abs(sample.image.astype(int) - rgb(3)).mean() < 40


# ----------------------------------------------------------------------------------------- rejects

_PNG = encode(rgb(9))
_RLE = IngestConfig(mask_kind=MaskKind.RLE)
_INSTANCE = IngestConfig(mask_kind=MaskKind.INSTANCE)
_REJECT_CASES = {
    "no image": (IngestConfig(), [("b.json", as_json({}))], RejectReason.MISSING_IMAGE),
    "garbage image": (IngestConfig(), [("b.jpg", b"not an image")], RejectReason.UNDECODABLE_IMAGE),
    "truncated image": (IngestConfig(), [("b.png", _PNG[: len(_PNG) // 2])], RejectReason.UNDECODABLE_IMAGE),
    "image too large": (SMALL, [("b.png", encode(rgb(9, 20, 20)))], RejectReason.IMAGE_TOO_LARGE),
    "invalid json": (IngestConfig(), [("b.png", _PNG), ("b.json", b"{oops")], RejectReason.BAD_JSON),
    "json not object": (IngestConfig(), [("b.png", _PNG), ("b.json", b"[1, 2]")], RejectReason.BAD_JSON),
    "garbage mask": (_INSTANCE, [("b.png", _PNG), ("b.mask.png", b"xx")], RejectReason.UNDECODABLE_MASK),
    "rgb mask": (_INSTANCE, [("b.png", _PNG), ("b.mask.png", _PNG)], RejectReason.UNDECODABLE_MASK),
    "mask size": (
        _INSTANCE,
        [("b.png", _PNG), ("b.mask.png", encode(np.zeros((4, 6), np.uint8)))],
        RejectReason.MASK_SIZE_MISMATCH,
    ),
    "missing mask": (IngestConfig(), [("b.png", _PNG)], RejectReason.MISSING_MASK),
    "missing rle": (_RLE, [("b.png", _PNG)], RejectReason.MISSING_MASK),
    # an SA-1B-style sample in an instance-mask build used to become unlabelled superpixels
    "rle in an instance build": (_INSTANCE, [("b.png", _PNG), ("b.rle.json", b"[]")], RejectReason.MISSING_MASK),
    "unknown mask kind": (IngestConfig(), [("b.png", _PNG), ("b.mask.png", _PNG)], RejectReason.UNKNOWN_MASK_KIND),
    "rle not json": (_RLE, [("b.png", _PNG), ("b.rle.json", b"nope")], RejectReason.BAD_ANNOTATION),
    "rle not list": (_RLE, [("b.png", _PNG), ("b.rle.json", b'{"segmentation": 1}')], RejectReason.BAD_ANNOTATION),
    "rle not objects": (_RLE, [("b.png", _PNG), ("b.rle.json", b"[1, 2]")], RejectReason.BAD_ANNOTATION),
}


@pytest.mark.parametrize("case", list(_REJECT_CASES))
def test_each_reject_reason_keeps_its_neighbours(tmp_path, case):
    config, bad, reason = _REJECT_CASES[case]
    shard = write(tmp_path / "s.tar", tar_bytes(good("a", 1) + bad + good("c", 3)))

    a, b, c = iter_samples(shard, config)

    assert isinstance(b, Reject) and (b.shard, b.key, b.reason) == (shard, "b", reason) and b.detail
    for item, key, seed, index in [(a, "a", 1, 0), (c, "c", 3, 2)]:
        assert isinstance(item, Sample) and (item.key, item.index) == (key, index)
        assert np.array_equal(item.image, rgb(seed))


def test_reject_details_are_actionable(tmp_path):
    shard = write(tmp_path / "rle.tar", tar_bytes(good("a", 1) + [("b.png", _PNG), ("b.rle.json", b"[]")]))
    _, b = iter_samples(shard, _INSTANCE)
    assert "no mask.png member (mask_kind=instance)" in b.detail and "rle.json" in b.detail
    assert "--mask-kind auto" in b.detail and "--on-missing-mask superpixels" in b.detail

    bad = [("b.png", _PNG), ("b.mask.png", encode(np.zeros((4, 6), np.uint8)))]
    shard = write(tmp_path / "s.tar", tar_bytes(bad + [("c.png", encode(rgb(9, 20, 20)))]))
    b, c = iter_samples(shard, IngestConfig(mask_kind=MaskKind.INSTANCE, max_image_pixels=100))
    assert "6x4" in b.detail and "10x8" in b.detail
    assert "20x20" in c.detail and "max_image_pixels=100" in c.detail


# ----------------------------------------------------------------------------------------- broken shards


def test_truncated_member_ends_the_shard(tmp_path):
    data = tar_bytes(good("a", 1) + good("b", 2) + good("c", 3))
    shard = write(tmp_path / "s.tar", data[: data_offset(data, "c.mask.png") + 10])

    items = list(iter_samples(shard, IngestConfig()))

    assert_good(items[0], "a", 1, 0, shard)
    assert_good(items[1], "b", 2, 1, shard)
    assert len(items) == 3 and isinstance(items[2], Reject)
    assert (items[2].key, items[2].reason) == ("c", RejectReason.TRUNCATED_MEMBER)


def test_truncated_gzip_shard(tmp_path):
    data = tar_bytes(good("a", 1) + good("b", 2) + good("c", 3), gz=True)
    shard = write(tmp_path / "s.tar.gz", data[: int(len(data) * 0.6)])

    items = list(iter_samples(shard, IngestConfig()))

    assert all(isinstance(item, Sample) for item in items[:-1]) and len(items) >= 2
    assert isinstance(items[-1], Reject) and items[-1].reason is RejectReason.TRUNCATED_MEMBER


@pytest.mark.parametrize("tail", [b"", b"\xab" * 1024], ids=["no end marker", "garbage tail"])
def test_unterminated_archive_rejects_its_last_group(tmp_path, tail):
    shard = write(tmp_path / "s.tar", tar_bytes(good("a", 1) + good("b", 2), end_marker=False) + tail)

    a, b = iter_samples(shard, IngestConfig())

    assert_good(a, "a", 1, 0, shard)
    assert isinstance(b, Reject) and (b.key, b.reason) == ("b", RejectReason.TRUNCATED_MEMBER)


@pytest.mark.parametrize("content", [b"this is not a tar file" * 100, b""], ids=["text", "empty"])
def test_not_a_tar_raises(tmp_path, content):
    shard = write(tmp_path / "s.tar", content)
    with pytest.raises(ShardReadError, match="s.tar"):
        list(iter_samples(shard, IngestConfig()))


def test_missing_shard_raises(tmp_path, s3):
    with pytest.raises(ShardReadError, match="gone.tar"):
        list(iter_samples(str(tmp_path / "gone.tar"), IngestConfig()))
    options, bucket = s3
    with pytest.raises(ShardReadError, match="gone.tar"):
        list(iter_samples(f"s3://{bucket}/gone.tar", IngestConfig(), options))
