"""Folder layouts and class tables of public segmentation datasets, as `refbank convert` reads them.

Each layout is the one the field's tools (mmsegmentation) read, with the class ids its benchmarks score:
- ADE20K (SceneParsing, ADEChallengeData2016): images/{split}/*.jpg, annotations/{split}/*.png; pixel 0 is
  "other" (ignored), 1..150 are the classes → class ids 0..149.
- COCO-Stuff 164k: images/{split}/*.jpg and either annotations/{split}/*_labelTrainIds.png (171 train ids,
  255 ignored) or the released stuffthingmaps annotations/{split}/*.png (pixel = COCO category id - 1, 255
  unlabeled), mapped to the same 171 train ids.
- Pascal VOC 2012: JPEGImages/*.jpg, SegmentationClass/*.png (palette indices 0..20, background included;
  255 = void), ImageSets/Segmentation/{split}.txt.
- Pascal Context (VOC2010 with the 59-class context masks): JPEGImages, SegmentationClassContext/*.png
  (0 = background, 1..59), ImageSets/SegmentationContext/{split}.txt; "pascal-context" scores the 59
  classes (background ignored), "pascal-context-60" keeps background as class 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255  # the class-mask value of unlabelled pixels in converted corpora (SegmentConfig.ignore_value)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush", "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net",
    "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad",
    "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
# COCO category ids that have pixels in COCO-Stuff (80 things with the detection gaps, then 91 stuff), in
# train-id order: train id = position in this list
_COCO_STUFF_IDS = (*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
                   *range(72, 83), *range(84, 91), *range(92, 183))

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

PASCAL_CONTEXT_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor", "bag", "bed",
    "bench", "book", "building", "cabinet", "ceiling", "cloth", "computer", "cup", "door", "fence", "floor",
    "flower", "food", "grass", "ground", "keyboard", "light", "mountain", "mouse", "curtain", "platform", "sign",
    "plate", "road", "rock", "shelves", "sidewalk", "sky", "snow", "bedclothes", "track", "tree", "truck", "wall",
    "water", "window", "wood",
)


@dataclass(frozen=True)
class Layout:
    """Where a dataset keeps a split's images and masks, and how mask pixels become class ids.

    images / masks: folders under the dataset root ({split} is replaced); mask_suffixes: the mask of image
    <stem>.jpg is <stem><suffix> in `masks`, the first suffix that exists wins; split_list: a file under the
    root listing a split's image stems (None: every image in `images`); classes: class id → name; lookup:
    (256,) uint8 raw mask value → class id, IGNORE for unlabelled, one table per mask suffix."""

    name: str
    images: str
    masks: str
    mask_suffixes: tuple[str, ...]
    lookups: tuple[np.ndarray, ...]
    classes: tuple[str, ...]
    splits: tuple[str, ...]
    split_list: str | None = None
    image_suffix: str = ".jpg"


def _table(mapping: dict[int, int]) -> np.ndarray:
    """(256,) uint8: raw value → class id for the values in `mapping`, IGNORE for every other value."""
    table = np.full(256, IGNORE, np.uint8)
    for raw, class_id in mapping.items():
        table[raw] = class_id
    return table


def _identity(count: int) -> np.ndarray:
    """Raw values 0..count-1 are the class ids; anything else is unlabelled."""
    return _table({i: i for i in range(count)})


def _shift_down(count: int) -> np.ndarray:
    """Raw 1..count are classes 0..count-1; raw 0 (background / other) is unlabelled (mmseg reduce_zero_label)."""
    return _table({i + 1: i for i in range(count)})


LAYOUTS: dict[str, Layout] = {
    "ade20k": Layout("ade20k", "images/{split}", "annotations/{split}", (".png",), (_shift_down(150),),
                     ADE20K_CLASSES, ("training", "validation")),
    "coco-stuff": Layout("coco-stuff", "images/{split}", "annotations/{split}", ("_labelTrainIds.png", ".png"),
                         (_identity(171), _table({cid - 1: i for i, cid in enumerate(_COCO_STUFF_IDS)})),
                         COCO_STUFF_CLASSES, ("train2017", "val2017")),
    "voc": Layout("voc", "JPEGImages", "SegmentationClass", (".png",), (_identity(21),), VOC_CLASSES,
                  ("train", "val", "trainval"), split_list="ImageSets/Segmentation/{split}.txt"),
    "pascal-context": Layout("pascal-context", "JPEGImages", "SegmentationClassContext", (".png",),
                             (_shift_down(59),), PASCAL_CONTEXT_CLASSES[1:], ("train", "val"),
                             split_list="ImageSets/SegmentationContext/{split}.txt"),
    "pascal-context-60": Layout("pascal-context-60", "JPEGImages", "SegmentationClassContext", (".png",),
                                (_identity(60),), PASCAL_CONTEXT_CLASSES, ("train", "val"),
                                split_list="ImageSets/SegmentationContext/{split}.txt"),
}
