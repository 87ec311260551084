"""Curation quality on generated corpora with the stand-in encoder (synthetic-clip): pairing accuracy and coverage,
how filtering treats deliberately wrong labels, and the vocabulary mIoU of the curated bank against the uncurated
one in the same run. Prints JSON.

Truth comes from the regenerated scenes (bank_builder.synthetic.truth): a segment's class is the majority of the
pixels under it (unlabelled clutter counting as a class no label names); a label is right when it names that
class. Cases, each built through the real pipeline (Ray, parts, curate, index):
  pairing          clean captions, superpixels: each pairing rule's accuracy and coverage, then after curation
  wrong_labels     instance masks with 20% of the labels flipped to another class (make-corpus wrong_label_rate)
  wrong_phrases    superpixels with captions whose phrases are 20% wrong (wrong_phrase_rate)
mIoU on the held-out split by the project's evaluator (jobs.eval.evaluate; each run scores every bank of the
case in one pass), the uncurated bank against a copy curated per config and indexed again: vocabulary mode
(superpixel regions, the 13 class names, one prototype per class; a second run with 4) and open-set mode (the 10
nearest bank segments vote; a paired phrase label such as "tabby cat" votes for the class it matches by text, and
unlabelled segments are left out of the vote: the evaluator's defaults).

    python bench/curation.py --workdir /tmp/curation-bench [--case pairing --case wrong_labels ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from bank_builder.encoders.fit import SHIPPED_CHECKPOINT
from bank_builder.format import BankRef, read_manifest
from bank_builder.format.curation import read_decisions
from bank_builder.format.index_layout import read_label_table
from bank_builder.index import build_index
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, iter_scenes, make_corpus
from bank_builder.synthetic.truth import SegmentTruth, bank_truth
from jobs.eval import EvalConfig, Variant, evaluate

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


def heldout(corpus: CorpusConfig, root: Path) -> str:
    """Shard pattern of `corpus`'s held-out split with instance masks, what jobs.eval scores against: the corpus's
    own, or for a superpixel corpus (no masks) its held-out split written again with them under root/heldout."""
    if corpus.mask_kind != "none":
        return str(root / "corpus" / "heldout-*.tar")
    make_corpus(str(root / "heldout"), replace(corpus, shards=0, mask_kind="instance"))
    return str(root / "heldout" / "heldout-*.tar")


def miou(banks: list[BankRef], pattern: str, variant: Variant = Variant(),
         modes: tuple[str, ...] = ("vocabulary", "open_set")) -> dict[str, dict[str, float]]:
    """mIoU per bank (by its folder name) and mode on the held-out shards, in one jobs.eval.evaluate run (the
    project's evaluator: the 13 class names of the corpus's class table, superpixel regions, kNN k = 10)."""
    report = evaluate(EvalConfig(banks=tuple(b.uri for b in banks), heldout=pattern, modes=modes, base=variant,
                                 oracle=False, device="cpu"))
    rows = [r for r in report.rows if r["kind"] == "bank"]
    return {_name(b): {m: round(r["modes"][m]["miou"], 4) for m in modes} for b, r in zip(banks, rows)}


def prototype_cosines(reference: BankRef, bank: BankRef) -> list[float]:
    """[min, median, max] over the labels both label tables hold of the cosine between their visual prototypes."""
    tables = [read_label_table(b, read_manifest(b).index) for b in (reference, bank)]
    rows = [{label: np.asarray(t.prototypes[i], np.float64) for i, label in enumerate(t.labels)} for t in tables]
    cosines = [float(rows[0][label] @ rows[1][label]) for label in sorted(set(rows[0]) & set(rows[1]))]
    return np.round(np.percentile(cosines, [0, 50, 100]), 3).tolist()


def _name(bank: BankRef) -> str:
    """A bank's row name in the JSON: its case folder and its own ("wrong-labels/bank-curated-default")."""
    path = Path(bank.uri)
    return f"{path.parent.name}/{path.name}"


def curated_case(ref: BankRef, corpus: CorpusConfig, configs: dict[str, CurationConfig],
                 extra: tuple[BankRef, ...] = ()) -> dict:
    """Index the bank uncurated; per curation config a copy curated (filtering figures) and indexed; then every
    bank (`extra` first) scored in one evaluation run, and again with 4 prototypes per class."""
    scenes = {k: s for k, s, _ in iter_scenes(corpus)}
    truth = bank_truth(ref, read_manifest(ref), scenes)
    build_index(ref)
    out: dict = {"pairing": None, "curation": {}}
    if "paired" in truth.label_source:
        out["pairing"] = pairing(truth, _phrases(ref, corpus))
    banks = [*extra, ref]
    for name, config in configs.items():
        copy = BankRef(f"{ref.uri}-curated-{name}")
        shutil.copytree(ref.uri, copy.uri)
        start = time.perf_counter()
        curate_bank(copy, config)
        seconds = round(time.perf_counter() - start, 2)
        keep, reason = decisions(copy)
        build_index(copy)
        out["curation"][name] = {**filtering(truth, keep, reason, scenes), "curate_s": seconds}
        banks.append(copy)
    pattern = heldout(corpus, Path(ref.uri).parent)
    if extra:
        out["prototype_cosine_to_first"] = {_name(b): prototype_cosines(extra[0], b) for b in banks[1:]}
    out["miou"] = miou(banks, pattern)
    out["miou_prototypes_4"] = miou(banks, pattern, Variant(prototypes=4), ("vocabulary",))
    return out


def _phrases(ref: BankRef, corpus: CorpusConfig) -> int:
    """Candidate phrases of the training images (what pairing could pair at most)."""
    return sum(len(c.phrases) if c is not None else len(set(s.labels.values())) for _, s, c in iter_scenes(corpus))


CASES = ("pairing", "wrong_labels", "wrong_phrases")
CONFIGS = {"default": CurationConfig(), "confusion_margin_0": CurationConfig(confusion_margin=0.0)}


def pairing_case(base: CorpusConfig, workdir: Path) -> dict:
    """Each pairing rule on the clean-caption corpus (seed 41): pairing figures, then after default curation."""
    captions = replace(base, mask_kind="none", seed=41, captions=True)
    rules = {"mutual_margin_0.05": PairingConfig(), "mutual": PairingConfig(margin=0.0),
             "best": PairingConfig(rule="best", margin=0.0), "mutual_threshold_0.5": PairingConfig(threshold=0.5)}
    out = {}
    for name, rule in rules.items():
        ref = build(captions, workdir / f"pairing-{name}", rule)
        truth = bank_truth(ref, read_manifest(ref), {k: s for k, s, _ in iter_scenes(captions)})
        figures = pairing(truth, _phrases(ref, captions))
        curate_bank(ref, CurationConfig())
        keep, reason = decisions(ref)
        paired = np.array(truth.label_source) == "paired"
        figures.update(kept_paired=int((paired & keep).sum()), kept_accuracy=share(truth.right, paired & keep))
        out[name] = figures
    return out


def wrong_labels_case(base: CorpusConfig, workdir: Path) -> dict:
    """Instance masks, 20 % of the training labels wrong (seed 42), beside the same corpus with true labels."""
    flips = replace(base, seed=42, wrong_label_rate=0.2, heldout_shards=1)
    clean = build(replace(flips, wrong_label_rate=0.0), workdir / "clean-labels")
    build_index(clean)
    return curated_case(build(flips, workdir / "wrong-labels"), flips, CONFIGS, (clean,))


def wrong_phrases_case(base: CorpusConfig, workdir: Path) -> dict:
    """Captioned superpixels whose phrases are 20 % wrong (seed 43), paired by the default rule."""
    phrases = replace(base, mask_kind="none", seed=43, captions=True, wrong_phrase_rate=0.2, heldout_shards=1)
    return curated_case(build(phrases, workdir / "wrong-phrases"), phrases, CONFIGS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("curation-bench"))
    parser.add_argument("--images", type=int, default=256, help="training images per corpus (4 shards; one more "
                        "shard of a quarter as many is held out for the mIoU)")
    parser.add_argument("--size", type=int, default=128, help="image side, pixels")
    parser.add_argument("--case", choices=CASES, action="append", help="run only this case (repeatable; default all)")
    args = parser.parse_args()
    if args.workdir.exists() and any(args.workdir.iterdir()):
        raise SystemExit(f"{args.workdir} is not empty: give a new --workdir (the banks are built from scratch)")
    import ray

    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    spp = max(1, args.images // 4)
    base = CorpusConfig(shards=4, samples_per_shard=spp, image_size=args.size)
    results: dict = {"images": 4 * spp, "heldout_images": spp, "image_size": args.size, "cases": {}}
    start = time.perf_counter()
    run = {"pairing": pairing_case, "wrong_labels": wrong_labels_case, "wrong_phrases": wrong_phrases_case}
    for case in args.case or CASES:
        results["cases"][case] = run[case](base, args.workdir)
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
