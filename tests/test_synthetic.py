"""The synthetic corpus generator: determinism, layout, and every mask kind decoded back from the tars."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from bank_builder.config import MaskKind
from bank_builder.synthetic import (
    BACKGROUND_CLASSES,
    CorpusConfig,
    Scene,
    class_names,
    encode_sample,
    make_corpus,
    make_scene,
    min_visible_area,
    sample_key,
    tar_bytes,
)

SMALL = CorpusConfig(shards=2, samples_per_shard=4, image_size=96, heldout_shards=1, seed=7)


def read_tar(data: bytes) -> tuple[list[str], dict[str, dict[str, bytes]]]:
    """(member names in tar order, key -> {extension: payload}) of a WebDataset shard."""
    names: list[str] = []
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            names.append(member.name)
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return names, samples


def decode_png(data: bytes) -> np.ndarray:
    """A PNG member as a numpy array with its stored dtype."""
    return np.array(Image.open(io.BytesIO(data)))


def corpus_samples(root: Path, split: str = "train") -> dict[str, dict[str, bytes]]:
    """Every sample of a split under a local corpus directory, by key."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(root.glob(f"{split}-*.tar")):
        samples.update(read_tar(shard.read_bytes())[1])
    return samples


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[MaskKind, Path]:
    """The SMALL corpus written once per mask kind (same seed, so the same scenes in each)."""
    roots = {}
    for kind in [k for k in MaskKind if k is not MaskKind.AUTO]:
        roots[kind] = tmp_path_factory.mktemp(f"corpus-{kind.value}")
        make_corpus(str(roots[kind]), replace(SMALL, mask_kind=kind))
    return roots


@pytest.fixture(scope="module")
def instance_maps(corpora) -> dict[str, tuple[np.ndarray, dict[int, str]]]:
    """key -> (instance map, id -> label) from the instance corpus: the ground truth for other kinds."""
    maps = {}
    for key, sample in corpus_samples(corpora[MaskKind.INSTANCE]).items():
        meta = json.loads(sample["json"])
        maps[key] = (decode_png(sample["mask.png"]), {s["id"]: s["label"] for s in meta["segments"]})
    return maps


def test_class_table():
    names = class_names()
    assert len(names) == len(set(names)) >= 8
    assert set(BACKGROUND_CLASSES) < set(names)
    assert all("." not in n and n == n.strip() for n in names)


def test_make_scene_contract():
    rng = np.random.default_rng(0)
    unlabeled_seen = 0
    for _ in range(40):
        scene = make_scene(rng, 128, 1, 6)
        assert scene.image.shape == (128, 128, 3) and scene.image.dtype == np.uint8
        assert scene.instances.shape == (128, 128) and scene.instances.dtype == np.uint16
        ids = set(np.unique(scene.instances).tolist()) - {0}
        assert ids == set(scene.labels) == set(range(1, len(scene.labels) + 1))
        areas = np.bincount(scene.instances.ravel())
        assert all(areas[i] >= min_visible_area(128) for i in ids)
        assert all(name in scene.caption for name in scene.labels.values())
        assert sum(label in BACKGROUND_CLASSES for label in scene.labels.values()) <= 1
        unlabeled_seen += bool((scene.instances == 0).any())
    assert 0 < unlabeled_seen < 40  # some scenes have unlabeled pixels (clutter, dropped slivers)


def test_make_scene_is_seeded_and_respects_object_count():
    first = make_scene(np.random.default_rng(5), 64, 2, 4)
    second = make_scene(np.random.default_rng(5), 64, 2, 4)
    assert np.array_equal(first.image, second.image) and np.array_equal(first.instances, second.instances)
    assert first.labels == second.labels and first.caption == second.caption
    bare = make_scene(np.random.default_rng(1), 64, 0, 0)
    assert bare.labels == {1: bare.labels[1]} and bare.labels[1] in BACKGROUND_CLASSES


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    make_corpus(str(tmp_path / "a"), SMALL)
    make_corpus(f"file://{tmp_path / 'b'}", SMALL)
    make_corpus(str(tmp_path / "c"), replace(SMALL, seed=8))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["heldout-000000.tar", "train-000000.tar", "train-000001.tar"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_layout_and_summary_match_the_tars(tmp_path):
    summary = make_corpus(str(tmp_path), SMALL)
    assert summary.shards == [f"{tmp_path}/train-{i:06d}.tar" for i in range(2)]
    assert summary.heldout == [f"{tmp_path}/heldout-000000.tar"]
    labels: Counter[str] = Counter()
    for shard_index, url in enumerate(summary.shards):
        names, samples = read_tar(Path(url).read_bytes())
        keys = [sample_key("train", shard_index, i) for i in range(4)]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "mask.png")]
        with tarfile.open(url) as tar:
            assert {(m.mtime, m.uid, m.gid, m.mode) for m in tar.getmembers()} == {(0, 0, 0, 0o644)}
        for sample in samples.values():
            meta = json.loads(sample["json"])
            assert meta["source"] == "refbank-synthetic"
            assert meta["classes"] == {str(i): n for i, n in enumerate(class_names())}
            assert meta["phrases"] == sorted({s["label"] for s in meta["segments"]})
            labels.update(s["label"] for s in meta["segments"])
    assert summary.samples == 8
    assert summary.segments == sum(labels.values()) and summary.class_counts == dict(sorted(labels.items()))


def test_instance_masks_match_segments(instance_maps):
    for instances, labels in instance_maps.values():
        assert instances.dtype == np.uint8 and instances.shape == (96, 96)
        assert set(np.unique(instances).tolist()) - {0} == set(labels)


def test_class_masks_are_the_instance_labels(corpora, instance_maps):
    table = class_names()
    for key, sample in corpus_samples(corpora[MaskKind.CLASS]).items():
        classes, (instances, labels) = decode_png(sample["mask.png"]), instance_maps[key]
        assert classes.dtype == np.uint8 and "segments" not in json.loads(sample["json"])
        assert set(np.unique(classes).tolist()) <= set(range(len(table))) | {255}
        assert np.array_equal(classes == 255, instances == 0)
        for instance_id, label in labels.items():
            assert (classes[instances == instance_id] == table.index(label)).all()


def test_binary_masks_are_the_objects(corpora, instance_maps):
    for key, sample in corpus_samples(corpora[MaskKind.BINARY]).items():
        binary, (instances, labels) = decode_png(sample["mask.png"]), instance_maps[key]
        assert json.loads(sample["json"])["label"] == "foreground"
        objects = [i for i, label in labels.items() if label not in BACKGROUND_CLASSES]
        assert set(np.unique(binary).tolist()) <= {0, 255}
        assert np.array_equal(binary == 255, np.isin(instances, objects))


# pycocotools 2.0.11 decode under numpy 2 warns about `__array__(copy=...)`; the result is correct.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_rle_annotations_decode_to_the_instances(corpora, instance_maps):
    for key, sample in corpus_samples(corpora[MaskKind.RLE]).items():
        assert set(sample) == {"jpg", "json", "rle.json"}
        annotations, (instances, labels) = json.loads(sample["rle.json"]), instance_maps[key]
        assert {a["id"]: a["label"] for a in annotations} == labels
        for annotation in annotations:
            assert annotation["segmentation"]["size"] == [96, 96]
            decoded = mask_utils.decode(annotation["segmentation"])
            assert np.array_equal(decoded.astype(bool), instances == annotation["id"])
            assert annotation["area"] == int(decoded.sum())
            assert annotation["bbox"] == mask_utils.toBbox(annotation["segmentation"]).astype(int).tolist()


def test_no_mask_kind_writes_image_and_json_only(corpora):
    samples = corpus_samples(corpora[MaskKind.NONE])
    assert len(samples) == 8 and all(set(s) == {"jpg", "json"} for s in samples.values())


def test_heldout_images_are_new(corpora):
    root = corpora[MaskKind.INSTANCE]
    train, heldout = corpus_samples(root), corpus_samples(root, "heldout")
    assert list(heldout) == [sample_key("heldout", 0, i) for i in range(4)]
    assert not {s["jpg"] for s in train.values()} & {s["jpg"] for s in heldout.values()}


def test_png_images_and_16_bit_instance_masks():
    instances = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) % 300 + 1
    scene = Scene(np.zeros((40, 40, 3), np.uint8), instances, {i: "cat" for i in range(1, 301)}, "cats")
    members = dict(encode_sample("k", scene, CorpusConfig(image_format="png")))
    assert list(members) == ["k.png", "k.json", "k.mask.png"]
    decoded = decode_png(members["k.mask.png"])
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, instances)
    assert np.array_equal(decode_png(members["k.png"]), scene.image)
    assert read_tar(tar_bytes(list(members.items())))[0] == list(members)


@pytest.mark.parametrize(
    "change", [{"image_format": "gif"}, {"mask_kind": "polygon"}, {"mask_kind": "auto"}, {"min_objects": 3, "max_objects": 2}]
)
def test_bad_config_is_refused_with_the_fix(tmp_path, change):
    with pytest.raises(ValueError, match="use|need"):
        make_corpus(str(tmp_path), replace(SMALL, **change))


def test_writes_to_s3_and_reads_back(s3, tmp_path):
    storage_options, bucket = s3
    config = CorpusConfig(shards=2, samples_per_shard=2, image_size=64, seed=3)
    summary = make_corpus(f"s3://{bucket}/corpus", config, storage_options=storage_options)
    assert summary.shards == [f"s3://{bucket}/corpus/train-{i:06d}.tar" for i in range(2)]
    local = make_corpus(str(tmp_path), config)
    fs, _ = fsspec.core.url_to_fs(summary.shards[0], **storage_options)
    assert sorted(fs.ls(f"{bucket}/corpus")) == [f"{bucket}/corpus/train-{i:06d}.tar" for i in range(2)]
    with fsspec.open(summary.shards[1], "rb", **storage_options) as remote:
        data = remote.read()
    assert data == Path(local.shards[1]).read_bytes()
    assert list(read_tar(data)[1]) == [sample_key("train", 1, i) for i in range(2)]
