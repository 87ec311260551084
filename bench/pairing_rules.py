"""Pairing rules compared offline on a tuning corpus (another seed than bench/curation.py's 41): accuracy and
coverage of each rule and margin, and why the wrong pairs are wrong. Prints JSON; docs/QUALITY.md ("Curation")
has the figures and how the default margin was chosen from them.

The corpus (clean captions, superpixels) is built once with pairing off, so every segment's stored embedding is
there; each image's phrases are embedded as the build embeds them, and every rule runs on the same vectors
through bank_builder.pairing.pair_image (alternatives not in the builder: a one-to-one assignment per image,
Hungarian on the segment × phrase cosines, alone and kept where mutual; a dual softmax). Truth: the majority
class under each segment (bank_builder.synthetic.truth).

    python bench/pairing_rules.py --workdir /tmp/pairing-rules --seed 141
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# bench/query.py would shadow the `query` package while this folder is on the path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np
from scipy.optimize import linear_sum_assignment

from bank_builder.config import BuildConfig, EncoderConfig, IngestConfig, PairingConfig, PipelineConfig
from bank_builder.embed import embed_labels
from bank_builder.encoders import load_encoder
from bank_builder.encoders.fit import SHIPPED_CHECKPOINT
from bank_builder.format import BankRef, parts, read_manifest
from bank_builder.pairing import candidate_phrases, pair_image
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, iter_scenes, make_corpus
from bank_builder.synthetic.truth import label_class, segment_class

ENCODER = EncoderConfig(name="synthetic-clip", weights=str(SHIPPED_CHECKPOINT), device="cpu")
MARGINS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1)


def images(corpus: CorpusConfig, root: Path) -> list[dict]:
    """Per training image: segment embeddings x (n, C) float16, their true classes, phrase labels and text (P, C)."""
    make_corpus(str(root / "corpus"), corpus)
    build_bank(BuildConfig(source=str(root / "corpus" / "train-*.tar"), bank=str(root / "bank"),
                           ingest=IngestConfig(mask_kind="none"), encoder=ENCODER,
                           pairing=PairingConfig(enabled=False), pipeline=PipelineConfig(progress_interval_s=0.0)))
    ref = BankRef(str(root / "bank"))
    scenes = {key: (scene, caption) for key, scene, caption in iter_scenes(corpus)}
    out: dict[str, dict] = {}
    for part in read_manifest(ref).parts:
        for table in parts.iter_row_groups(ref, part, ["image_key", "mask", parts.VISUAL]):
            rows = zip(table["image_key"].to_pylist(), table["mask"].to_pylist(),
                       parts.matrix(table[parts.VISUAL], np.float16))
            for key, rle, x in rows:
                image = out.setdefault(key, {"x": [], "truth": []})
                image["x"].append(x)
                image["truth"].append(segment_class(scenes[key][0], rle))
    encoder, cache = load_encoder(ENCODER), {}
    for key, image in out.items():
        image["x"] = np.stack(image["x"])
        image["labels"] = candidate_phrases({"phrases": scenes[key][1].phrases}, PairingConfig())
        image["text"] = np.stack(embed_labels(encoder, image["labels"], cache)) if image["labels"] else None
    return [image for image in out.values() if image["labels"]]


def hungarian(visual: np.ndarray, text: np.ndarray, mutual: bool) -> np.ndarray:
    """One segment per phrase maximising the image's summed cosine; `mutual`: kept where it is the segment's best."""
    sims = visual.astype(np.float32) @ text.astype(np.float32).T
    rows, cols = linear_sum_assignment(-sims)
    if mutual:
        own = sims[rows].argmax(axis=1) == cols
        rows, cols = rows[own], cols[own]
    chosen = np.full(len(visual), -1, np.int64)
    chosen[rows] = cols
    return chosen


def dual_softmax(visual: np.ndarray, text: np.ndarray, temperature: float) -> np.ndarray:
    """Each phrase's best segment by softmax over segments × softmax over phrases, kept where mutual."""
    logits = visual.astype(np.float32) @ text.astype(np.float32).T / temperature
    over_segments = np.exp(logits - logits.max(axis=0))
    over_phrases = np.exp(logits - logits.max(axis=1, keepdims=True))
    score = over_segments / over_segments.sum(axis=0) * over_phrases / over_phrases.sum(axis=1, keepdims=True)
    chosen = np.full(len(visual), -1, np.int64)
    for phrase, segment in enumerate(score.argmax(axis=0)):
        if score[segment].argmax() == phrase:
            chosen[segment] = phrase
    return chosen


def score(data: list[dict], rule) -> dict:
    """Accuracy, coverage and pairs per phrase of a rule (image → chosen phrase per segment)."""
    right = paired = 0
    for image in data:
        chosen = rule(image)
        for segment in np.flatnonzero(chosen >= 0):
            paired += 1
            right += label_class(image["labels"][chosen[segment]]) == image["truth"][segment]
    segments, phrases = sum(len(i["x"]) for i in data), sum(len(i["labels"]) for i in data)
    return {"paired": paired, "accuracy": round(right / paired, 3), "coverage": round(paired / segments, 3),
            "pairs_per_phrase": round(paired / phrases, 3)}


def errors(data: list[dict], config: PairingConfig) -> dict:
    """Why a rule's wrong pairs are wrong, and the best-minus-second phrase cosine of right and wrong pairs."""
    kinds: Counter[str] = Counter()
    gaps: dict[bool, list[float]] = {True: [], False: []}
    for image in data:
        sims = image["x"].astype(np.float32) @ image["text"].astype(np.float32).T
        top = np.sort(sims, axis=1)
        truth = np.array(image["truth"])
        chosen = pair_image(image["x"], image["text"], config)
        for segment in np.flatnonzero(chosen >= 0):
            named = label_class(image["labels"][chosen[segment]])
            ok = named == truth[segment]
            gaps[ok].append(float(top[segment, -1] - (top[segment, -2] if sims.shape[1] > 1 else -1.0)))
            if ok:
                continue
            own = np.flatnonzero(truth == named)
            if not len(own):
                kinds["the class is the majority of no segment (smaller than any superpixel)"] += 1
            elif sims[own[sims[own, chosen[segment]].argmax()]].argmax() == chosen[segment]:
                kinds["a segment of another class beat the class's own segments on cosine"] += 1
            else:
                kinds["the class's best segment prefers another phrase"] += 1
    return {"wrong_pairs": dict(kinds), **{f"gap_{'right' if ok else 'wrong'}_quartiles":
                                           np.percentile(g, [25, 50, 75]).round(3).tolist() for ok, g in gaps.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("pairing-rules"))
    parser.add_argument("--seed", type=int, default=141, help="corpus seed (bench/curation.py reports seed 41)")
    parser.add_argument("--images", type=int, default=256, help="training images (4 shards)")
    parser.add_argument("--size", type=int, default=128, help="image side, pixels")
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    corpus = CorpusConfig(shards=4, samples_per_shard=max(1, args.images // 4), image_size=args.size,
                          mask_kind="none", seed=args.seed, captions=True)
    data = images(corpus, args.workdir)
    results: dict = {"seed": args.seed, "images": len(data), "rules": {}}
    for rule in ("mutual", "best"):
        for margin in MARGINS:
            config = PairingConfig(rule=rule, margin=margin)
            results["rules"][f"{rule} margin {margin}"] = score(data, lambda i, c=config: pair_image(i["x"], i["text"], c))
    results["rules"]["hungarian"] = score(data, lambda i: hungarian(i["x"], i["text"], False))
    results["rules"]["hungarian, kept where mutual"] = score(data, lambda i: hungarian(i["x"], i["text"], True))
    for temperature in (0.01, 0.05, 0.1):
        results["rules"][f"dual softmax {temperature}"] = score(
            data, lambda i, t=temperature: dual_softmax(i["x"], i["text"], t))
    results["errors_mutual_margin_0"] = errors(data, PairingConfig(margin=0.0))
    results["errors_default"] = errors(data, PairingConfig())
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
