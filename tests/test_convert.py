"""`refbank convert`: tiny fixtures written in the ADE20K, COCO-Stuff, Pascal VOC and Pascal Context layouts,
converted, then read back by the builder's own ingest and segments stages."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bank_builder.config import IngestConfig, MaskKind, SegmentConfig
from bank_builder.convert import ConvertConfig, convert
from bank_builder.datasets import ADE20K_CLASSES, COCO_STUFF_CLASSES, IGNORE, PASCAL_CONTEXT_CLASSES, VOC_CLASSES
from bank_builder.ingest import iter_samples
from bank_builder.records import Sample
from bank_builder.segments import make_segments

CLASS_MASKS = IngestConfig(mask_kind=MaskKind.CLASS)


def jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """Write a small random JPEG (width, height) at `path`; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path.read_bytes()


def png(path: Path, values: np.ndarray, palette: bool = False) -> None:
    """Write an 8-bit mask PNG (a palette PNG, as VOC ships them, when `palette`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values.astype(np.uint8), mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        image.frombytes(values.astype(np.uint8).tobytes())  # keep the indices exactly
    image.save(path, format="PNG")


def blocks(values: list[int], size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """An (H, W) uint8 mask of vertical stripes, one per value."""
    width, height = size
    stripe = np.repeat(np.arange(len(values)), -(-width // len(values)))[:width]
    return np.tile(np.asarray(values, np.uint8)[stripe], (height, 1))


def read_back(shards: list[str]) -> dict[str, Sample]:
    """Every sample of the converted shards, decoded by the builder's ingest (class masks), by key."""
    samples = {}
    for shard in shards:
        for item in iter_samples(shard, CLASS_MASKS):
            assert isinstance(item, Sample), item
            samples[item.key] = item
    return samples


def segment_labels(sample: Sample) -> list[str]:
    """Labels of the segments the builder makes of a sample, in mask order."""
    return [s.label for s in make_segments(sample, SegmentConfig(min_area=1))]


def test_ade20k(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    images = {stem: jpeg(root / "images/validation" / f"{stem}.jpg", i)
              for i, stem in enumerate(["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"])}
    png(root / "annotations/validation/ADE_val_00000001.png", blocks([0, 1, 150]))
    png(root / "annotations/validation/ADE_val_00000002.png", blocks([3, 3, 10]))
    # ADE_val_00000003 has no mask: skipped and counted, not a crash
    report = convert(root, str(tmp_path / "out"), ConvertConfig("ade20k", "validation", samples_per_shard=1))
    assert (report.samples, report.skipped, report.examples) == (2, {"no mask": 1}, {"no mask": "ADE_val_00000003"})
    assert report.shards == [f"{tmp_path}/out/ade20k-validation-{i:06d}.tar" for i in range(2)]
    samples = read_back(report.shards)
    first = samples["validation-ADE_val_00000001"]
    # pixel 0 ("other") is ignored; 1..150 are classes 0..149 (mmseg's reduce_zero_label)
    np.testing.assert_array_equal(first.mask, blocks([IGNORE, 0, 149]))
    assert first.meta["classes"] == {str(i): n for i, n in enumerate(ADE20K_CLASSES)}
    assert (first.meta["source"], first.meta["file"]) == ("ade20k", "images/validation/ADE_val_00000001.jpg")
    assert segment_labels(first) == ["wall", "flag"]
    assert segment_labels(samples["validation-ADE_val_00000002"]) == ["sky", "grass"]
    decoded = np.asarray(Image.open(io.BytesIO(images["ADE_val_00000001"])).convert("RGB"))
    np.testing.assert_array_equal(first.image, decoded)  # the image bytes travel unchanged


def test_coco_stuff_train_ids_and_raw_stuffthingmaps(tmp_path):
    root = tmp_path / "coco_stuff164k"
    for i, stem in enumerate(["000000000139", "000000000285"]):
        jpeg(root / "images/val2017" / f"{stem}.jpg", i)
    png(root / "annotations/val2017/000000000139_labelTrainIds.png", blocks([0, 170, 255]))
    # raw stuffthingmaps: pixel = COCO id - 1. 0 → person (0), 12 → stop sign (id 13, train 11),
    # 11 → id 12 (no such category: unlabelled), 91 → banner (id 92, train 80), 181 → wood (id 182, train 170)
    png(root / "annotations/val2017/000000000285.png", blocks([0, 12, 11, 91, 181, 255]))
    report = convert(root, str(tmp_path / "out"), ConvertConfig("coco-stuff", "val2017"))
    assert (report.samples, report.skipped, len(report.shards), report.classes) == (2, {}, 1, 171)
    samples = read_back(report.shards)
    np.testing.assert_array_equal(samples["val2017-000000000139"].mask, blocks([0, 170, IGNORE]))
    np.testing.assert_array_equal(samples["val2017-000000000285"].mask, blocks([0, 11, IGNORE, 80, 170, IGNORE]))
    assert segment_labels(samples["val2017-000000000285"]) == ["person", "stop sign", "banner", "wood"]
    assert COCO_STUFF_CLASSES[80] == "banner"


def test_pascal_voc_split_list_and_palette_masks(tmp_path):
    root = tmp_path / "VOCdevkit/VOC2012"
    for i, stem in enumerate(["2007_000032", "2007_000033", "2007_000039"]):
        jpeg(root / "JPEGImages" / f"{stem}.jpg", i)
    png(root / "SegmentationClass/2007_000032.png", blocks([0, 1, 255, 20]), palette=True)
    png(root / "SegmentationClass/2007_000033.png", blocks([15, 0]), palette=True)
    png(root / "SegmentationClass/2007_000039.png", blocks([5]), palette=True)
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n2007_000032\n")
    report = convert(root, str(tmp_path / "out"), ConvertConfig("voc", "val"))
    samples = read_back(report.shards)
    assert sorted(samples) == ["val-2007_000032", "val-2007_000033"]  # only the split's images, sorted
    np.testing.assert_array_equal(samples["val-2007_000032"].mask, blocks([0, 1, 255, 20]))
    assert segment_labels(samples["val-2007_000032"]) == ["background", "aeroplane", "tvmonitor"]
    assert segment_labels(samples["val-2007_000033"]) == [VOC_CLASSES[0], "person"]


@pytest.mark.parametrize("dataset, expected", [
    ("pascal-context", ([IGNORE, 0, 58], ["aeroplane", "wood"])),
    ("pascal-context-60", ([0, 1, 59], ["background", "aeroplane", "wood"]))])
def test_pascal_context_59_and_60(tmp_path, dataset, expected):
    root = tmp_path / "VOC2010"
    jpeg(root / "JPEGImages/2008_000002.jpg", 0)
    png(root / "SegmentationClassContext/2008_000002.png", blocks([0, 1, 59]))
    (root / "ImageSets/SegmentationContext").mkdir(parents=True)
    (root / "ImageSets/SegmentationContext/val.txt").write_text("2008_000002\n")
    report = convert(root, str(tmp_path / "out"), ConvertConfig(dataset, "val"))
    (sample,) = read_back(report.shards).values()
    np.testing.assert_array_equal(sample.mask, blocks(expected[0]))
    assert segment_labels(sample) == expected[1]
    assert report.classes == len(PASCAL_CONTEXT_CLASSES) - (dataset == "pascal-context")  # 59 or 60


def test_same_input_same_bytes_and_bad_masks_are_skipped(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for i in range(3):
        jpeg(root / "images/training" / f"ADE_train_{i:08d}.jpg", i)
    png(root / "annotations/training/ADE_train_00000000.png", blocks([1, 2]))
    png(root / "annotations/training/ADE_train_00000001.png", blocks([1, 2], size=(20, 30)))  # wrong size
    Image.fromarray(np.zeros((30, 40), np.uint16) + 300).save(root / "annotations/training/ADE_train_00000002.png")
    first = convert(root, str(tmp_path / "a"), ConvertConfig("ade20k", "training"))
    second = convert(root, f"file://{tmp_path / 'b'}", ConvertConfig("ade20k", "training"))
    assert first.samples == 1 and sorted(first.skipped) == ["mask is not 8-bit class ids (PNG mode I;16)",
                                                            "mask size differs from the image"]
    assert Path(first.shards[0]).read_bytes() == (tmp_path / "b" / Path(first.shards[0]).name).read_bytes()


@pytest.mark.parametrize("config, match", [
    (ConvertConfig("cityscapes", "val"), "unknown dataset.*ade20k"),
    (ConvertConfig("ade20k", "val"), "no split 'val'.*validation"),
    (ConvertConfig("voc", "val"), "JPEGImages"),
])
def test_bad_options_name_the_fix(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        convert(tmp_path, str(tmp_path / "out"), config)
