"""Vocabulary-mode mIoU of encoders on a generated corpus, in process (no Ray, no index), with the superpixel ceiling.

Prints JSON. For each encoder: the training split's labelled segments are embedded as the builder embeds them and
averaged per class into prototypes (the bank's label table, exactly, instead of through an index); each held-out
image is cut into superpixels and segmented by `query.segment.Segmenter.vocabulary` over the 13 class names;
mIoU as `jobs.evaluate.mean_iou`. "oracle" labels every superpixel with its majority ground-truth class: the
best any encoder can do with these regions.

    python bench/vocab_miou.py --seed 1404 --encoder synthetic-clip=shipped --encoder clip-vit-b32=untrained
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# bench/query.py would shadow the `query` package while this folder is on the path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np

from bank_builder.config import EncoderConfig
from bank_builder.embed import TEXT_TEMPLATE, encode_batch
from bank_builder.encoders import load_encoder
from bank_builder.encoders.fit import SHIPPED_CHECKPOINT, prepare_segments
from bank_builder.synthetic import CorpusConfig, class_names, iter_scenes
from jobs.evaluate import mean_iou
from query.regions import RegionConfig, region_labels
from query.segment import Segmenter


def truth_map(scene) -> np.ndarray:
    """(H, W) int64: 1 + class index of each pixel's instance, 0 = unlabelled."""
    names = class_names()
    truth = np.zeros(scene.instances.shape, np.int64)
    for instance, label in scene.labels.items():
        truth[scene.instances == instance] = names.index(label) + 1
    return truth


def encoder_miou(encoder_config: EncoderConfig, corpus: CorpusConfig) -> float:
    """mIoU of vocabulary mode over the held-out split, prototypes from the training split."""
    encoder = load_encoder(encoder_config)
    names = list(class_names())
    train = prepare_segments(corpus, "train", encoder.spec)
    visual = []
    for start in range(0, len(train.images), 32):
        rows = (train.image_index >= start) & (train.image_index < start + 32)
        visual.append(encode_batch(encoder, train.images[start:start + 32], train.soft[rows],
                                   train.image_index[rows] - start, [None] * int(rows.sum()), {}).visual)
    vectors = np.concatenate(visual).astype(np.float32)
    prototypes = np.stack([vectors[train.classes == c].mean(axis=0) for c in range(len(names))])
    table = SimpleNamespace(labels=names, text=np.stack([encoder.encode_text([TEXT_TEMPLATE.format(n)])[0]
                                                         for n in names]),
                            prototypes=prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True),
                            counts=np.bincount(train.classes, minlength=len(names)))
    segmenter = Segmenter(encoder, None, None, table)
    predictions, truths = [], []
    for _, scene, _ in iter_scenes(corpus, "heldout"):
        predictions.append(segmenter.vocabulary(scene.image, names).label_map.astype(np.int64))
        truths.append(truth_map(scene))
    return mean_iou(predictions, truths, len(names))


def oracle_miou(corpus: CorpusConfig, grid: int) -> float:
    """mIoU when every superpixel takes its majority ground-truth class."""
    predictions, truths = [], []
    for _, scene, _ in iter_scenes(corpus, "heldout"):
        truth, regions = truth_map(scene), region_labels(scene.image, RegionConfig(), grid)
        votes = np.zeros((regions.max() + 1, len(class_names()) + 1), np.int64)
        np.add.at(votes, (regions.ravel(), truth.ravel()), 1)
        votes[:, 0] = 0  # unlabelled pixels do not vote
        predictions.append(votes.argmax(axis=1)[regions])
        truths.append(truth)
    return mean_iou(predictions, truths, len(class_names()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1404, help="corpus seed (the stand-in was fitted on 1401/1402)")
    parser.add_argument("--train-images", type=int, default=96, help="training images (prototypes), multiple of 24")
    parser.add_argument("--heldout-images", type=int, default=24)
    parser.add_argument("--encoder", action="append", default=None,
                        help="NAME=WEIGHTS; WEIGHTS 'shipped' = the stand-in checkpoint (repeatable)")
    args = parser.parse_args()
    corpus = CorpusConfig(shards=max(1, args.train_images // 24), samples_per_shard=24, seed=args.seed,
                          heldout_shards=max(1, args.heldout_images // 24))
    encoders = args.encoder or ["synthetic-clip=shipped", "synthetic-clip=untrained", "clip-vit-b32=untrained"]
    results = {}
    for item in encoders:
        name, _, weights = item.partition("=")
        weights = str(SHIPPED_CHECKPOINT) if weights == "shipped" else weights
        results[item] = round(encoder_miou(EncoderConfig(name=name, weights=weights, device="cpu"), corpus), 3)
    results["oracle"] = round(oracle_miou(corpus, grid=12), 3)
    print(json.dumps({"seed": args.seed, "train_images": corpus.shards * 24,
                      "heldout_images": corpus.heldout_shards * 24, "miou": results}, indent=1))


if __name__ == "__main__":
    main()
