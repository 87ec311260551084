"""Curation quality on generated corpora with the stand-in encoder (synthetic-clip): pairing accuracy and coverage,
how filtering treats deliberately wrong labels, and the vocabulary mIoU of the curated bank against the uncurated
one in the same run. Prints JSON.

Truth comes from the regenerated scenes (bank_builder.synthetic.truth): a segment's class is the majority of the
pixels under it (unlabelled clutter counting as a class no label names); a label is right when it names that
class. Cases, each built through the real pipeline (Ray, parts, curate, index):
  pairing          clean captions, superpixels: each pairing rule's accuracy and coverage, then after curation
  wrong_labels     instance masks with 20% of the labels flipped to another class (make-corpus wrong_label_rate)
  wrong_phrases    superpixels with captions whose phrases are 20% wrong (wrong_phrase_rate)
mIoU on the held-out split, as jobs/evaluate scores it, with the index built before curation (uncurated) and
after (curated): vocabulary mode (query.segment.Segmenter, superpixel regions, the 13 class names, the label
table's prototypes) and open-set mode (the 10 nearest bank segments vote).

    python bench/curation.py --workdir /tmp/curation-bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# bench/query.py would shadow the `query` package while this folder is on the path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np

from bank_builder.config import BuildConfig, EncoderConfig, IngestConfig, PairingConfig, PipelineConfig
from bank_builder.curate import CurationConfig, curate_bank
from bank_builder.encoders import load_encoder
from bank_builder.encoders.fit import SHIPPED_CHECKPOINT
from bank_builder.format import BankRef, read_manifest
from bank_builder.format.curation import read_decisions
from bank_builder.format.index_layout import read_label_table
from bank_builder.index import build_index
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, class_names, iter_scenes, make_corpus
from bank_builder.synthetic.truth import SegmentTruth, bank_truth, label_class, scene_class_map
from jobs.evaluate import mean_iou
from query.bank import open_bank
from query.search import BankSearcher
from query.segment import Segmenter

ENCODER = EncoderConfig(name="synthetic-clip", weights=str(SHIPPED_CHECKPOINT), device="cpu")


def build(corpus: CorpusConfig, root: Path, pairing: PairingConfig = PairingConfig()) -> BankRef:
    """Write `corpus` under root/corpus and build it into root/bank; the bank."""
    make_corpus(str(root / "corpus"), corpus)
    kind = "none" if corpus.mask_kind == "none" else "auto"
    build_bank(BuildConfig(source=str(root / "corpus" / "train-*.tar"), bank=str(root / "bank"),
                           ingest=IngestConfig(mask_kind=kind), encoder=ENCODER, pairing=pairing,
                           pipeline=PipelineConfig(progress_interval_s=0.0)))
    return BankRef(str(root / "bank"))


def decisions(ref: BankRef) -> tuple[np.ndarray, np.ndarray]:
    """(keep, reason) of every segment of CURRENT's curation, in part order (the manifest's, by ordinal)."""
    read = [read_decisions(ref, c) for c in read_manifest(ref).curation.parts]
    return np.concatenate([d.keep for d in read]), np.array([r for d in read for r in d.reason], object)


def share(mask: np.ndarray, of: np.ndarray) -> float | None:
    """mask's share of the rows `of` selects, rounded; None when it selects none."""
    return round(float(mask[of].mean()), 3) if of.any() else None


def filtering(truth: SegmentTruth, keep: np.ndarray, reason: np.ndarray, scenes: dict) -> dict:
    """What curation did to right and wrong labels: drop and keep shares, with and without duplicates."""
    labelled = np.array([label is not None for label in truth.label], bool)
    right, wrong = labelled & truth.right, labelled & ~truth.right
    duplicate = reason == "duplicate"
    absent = np.array([n is not None and n not in scenes[k].labels.values()
                       for n, k in zip(truth.named, truth.image_key)])
    return {"labelled": int(labelled.sum()), "wrong": int(wrong.sum()),
            "wrong_dropped": share(~keep, wrong), "right_kept": share(keep, right),
            "right_kept_or_duplicate": share(keep | duplicate, right),
            "wrong_absent_class": int((wrong & absent).sum()), "wrong_absent_class_dropped": share(~keep, wrong & absent),
            "kept_accuracy": share(truth.right, labelled & keep), "kept_labelled": int((labelled & keep).sum()),
            "dropped_by_reason": {r: int((reason == r).sum()) for r in sorted(set(reason) - {None})}}


def pairing(truth: SegmentTruth, phrases: int) -> dict:
    """Accuracy and coverage of the paired segments."""
    paired = np.array(truth.label_source) == "paired"
    return {"segments": len(truth.label), "paired": int(paired.sum()), "accuracy": share(truth.right, paired),
            "coverage": round(float(paired.mean()), 3), "pairs_per_phrase": round(float(paired.sum()) / phrases, 3)}


def miou(ref: BankRef, encoder, corpus: CorpusConfig) -> dict[str, float]:
    """mIoU on the held-out split of CURRENT's index: vocabulary mode (the label table's prototypes; the figure
    the target is about) and open-set mode (each region's 10 nearest bank segments vote; a label counts as the
    class it names)."""
    names = list(class_names())
    bank = open_bank(ref, expected_encoder=encoder.spec)
    segmenter = Segmenter(encoder, BankSearcher(bank), bank, read_label_table(ref, bank.manifest.index))
    vocabulary, open_set, truths = [], [], []
    for _, scene, _ in iter_scenes(corpus, "heldout"):
        vocabulary.append(segmenter.vocabulary(scene.image, names).label_map.astype(np.int64))
        result = segmenter.open_set(scene.image)
        lookup = np.array([0] + [names.index(label_class(c)) + 1 if label_class(c) else 0 for c in result.classes])
        open_set.append(lookup[result.label_map.astype(np.int64)])
        truths.append(scene_class_map(scene))
    return {"vocabulary": round(mean_iou(vocabulary, truths, len(names)), 4),
            "open_set": round(mean_iou(open_set, truths, len(names)), 4)}


def curated_case(ref: BankRef, corpus: CorpusConfig, encoder, configs: dict[str, CurationConfig]) -> dict:
    """Index uncurated (mIoU), then per curation config: curate, filtering figures, index, mIoU."""
    scenes = {k: s for k, s, _ in iter_scenes(corpus)}
    truth = bank_truth(ref, read_manifest(ref), scenes)
    build_index(ref)
    out = {"uncurated_miou": miou(ref, encoder, corpus), "pairing": None, "curation": {}}
    if "paired" in truth.label_source:
        out["pairing"] = pairing(truth, _phrases(ref, corpus))
    for name, config in configs.items():
        start = time.perf_counter()
        curate_bank(ref, config)
        seconds = round(time.perf_counter() - start, 2)
        keep, reason = decisions(ref)
        figures = filtering(truth, keep, reason, scenes)
        build_index(ref)
        out["curation"][name] = {**figures, "curate_s": seconds, "curated_miou": miou(ref, encoder, corpus)}
    return out


def _phrases(ref: BankRef, corpus: CorpusConfig) -> int:
    """Candidate phrases of the training images (what pairing could pair at most)."""
    return sum(len(c.phrases) if c is not None else len(set(s.labels.values())) for _, s, c in iter_scenes(corpus))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("curation-bench"))
    parser.add_argument("--images", type=int, default=256, help="training images per corpus (4 shards; one more "
                        "shard of a quarter as many is held out for the mIoU)")
    parser.add_argument("--size", type=int, default=128, help="image side, pixels")
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    encoder = load_encoder(ENCODER)
    spp = max(1, args.images // 4)
    base = CorpusConfig(shards=4, samples_per_shard=spp, image_size=args.size)
    configs = {"default": CurationConfig(), "confusion_margin_0": CurationConfig(confusion_margin=0.0)}
    results: dict = {"images": 4 * spp, "heldout_images": spp, "image_size": args.size, "cases": {}}
    start = time.perf_counter()

    captions = replace(base, mask_kind="none", seed=41, captions=True)
    rules = {"mutual": PairingConfig(), "best": PairingConfig(rule="best"),
             "mutual_threshold_0.5": PairingConfig(threshold=0.5)}
    results["cases"]["pairing"] = {}
    for name, rule in rules.items():
        ref = build(captions, args.workdir / f"pairing-{name}", rule)
        truth = bank_truth(ref, read_manifest(ref), {k: s for k, s, _ in iter_scenes(captions)})
        figures = pairing(truth, _phrases(ref, captions))
        curate_bank(ref, CurationConfig())
        keep, reason = decisions(ref)
        paired = np.array(truth.label_source) == "paired"
        figures.update(kept_paired=int((paired & keep).sum()), kept_accuracy=share(truth.right, paired & keep))
        results["cases"]["pairing"][name] = figures

    flips = replace(base, seed=42, wrong_label_rate=0.2, heldout_shards=1)
    clean = build(replace(flips, wrong_label_rate=0.0), args.workdir / "clean-labels")
    build_index(clean)
    results["cases"]["wrong_labels"] = {"clean_labels_miou": miou(clean, encoder, flips),
                                        **curated_case(build(flips, args.workdir / "wrong-labels"), flips, encoder,
                                                       configs)}
    phrases = replace(captions, seed=43, wrong_phrase_rate=0.2, heldout_shards=1)
    results["cases"]["wrong_phrases"] = curated_case(build(phrases, args.workdir / "wrong-phrases"), phrases, encoder,
                                                     configs)
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
