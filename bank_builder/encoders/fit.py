"""Fitting an open_clip encoder on generated scenes: a CLIP-style contrastive loss between mask-pooled segment
features and label / phrase text (`refbank fit-encoder`).

What it makes is a stand-in. The scenes of `bank_builder.synthetic` are cut from 13 photographs, so a model
fitted on them learns those 13 looks and the words for them: enough to make text and segments agree on
generated data (so pairing, curation and vocabulary mIoU measure something on this machine), and nothing
about real images. The registry entry it is loaded through says so (`note`), and so does every spec.

The training path is the build path: scenes are the very samples `make_corpus` writes for the same
CorpusConfig (`iter_scenes`), prepared by `embed.prepare_image` (squash to S×S, exact cell coverage), encoded
by `open_clip_encoder.dense_features` and pooled by `embed.pool_tensors`, the functions `refbank build` runs.
Held-out figures embed a split with another seed through the builder's own `embed.encode_batch`, once with the
starting weights and once with the saved checkpoint loaded back through the registry's checkpoint path. The
starting weights are any the registry loads: seeded untrained ones, a pretrained tag or a checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from bank_builder.config import EncoderConfig, config_to_dict
from bank_builder.embed import TEXT_TEMPLATE, encode_batch, pool_tensors, prepare_image
from bank_builder.encoders.base import Encoder, EncoderSpec
from bank_builder.encoders.open_clip_encoder import dense_features
from bank_builder.encoders.registry import load_encoder, pixels_to_tensor
from bank_builder.synthetic import CorpusConfig, class_names, class_phrases, iter_scenes

# Corpus seeds of the shipped fit. The corpora of the tests, the demo and the benches use small seeds
# (under 100), so no image of theirs is one the stand-in was fitted or selected on.
TRAIN_SEED = 1401
HELDOUT_SEED = 1402
SHIPPED_CHECKPOINT = Path(__file__).parent / "weights" / "synthetic-clip.safetensors"


@dataclass(frozen=True)
class FitConfig:
    """What to fit and on what. encoder: the registry entry and starting weights (an open_clip entry with a text
    tower); train / heldout: generated corpora (their `train` and `heldout` splits); steps of `batch_images`
    images each, AdamW with linear warm-up then cosine decay; cell_weight: weight of the one-cell segment term
    (`_cell_loss`) next to the segment ↔ text loss; seed: batch order, flips and text variants;
    threads: torch CPU threads while fitting (the process's setting is restored after); the same config and
    threads give the same checkpoint bytes."""

    encoder: EncoderConfig = EncoderConfig(name="synthetic-clip", weights="untrained", seed=0, device="cpu")
    train: CorpusConfig = CorpusConfig(shards=24, samples_per_shard=64, seed=TRAIN_SEED)
    heldout: CorpusConfig = CorpusConfig(shards=0, heldout_shards=4, samples_per_shard=64, seed=HELDOUT_SEED)
    steps: int = 1000
    batch_images: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    cell_weight: float = 1.0
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_images < 1 or self.threads < 1 or self.warmup_steps < 0:
            raise ValueError("steps, batch_images and threads must be >= 1, warmup_steps >= 0")
        if self.train.shards < 1 or self.heldout.heldout_shards < 1:
            raise ValueError("fitting needs train.shards >= 1 and heldout.heldout_shards >= 1")


@dataclass
class FitReport:
    """What a fit did. before / after: held-out figures of the starting weights and of the saved checkpoint
    (see `evaluate`); loss_first / loss_last: mean loss of the first and last tenth of the steps; seconds per
    stage (prepare, train, evaluate), measured on whatever else the machine was running."""

    checkpoint: str
    encoder: dict[str, Any]
    train_images: int
    train_segments: int
    heldout_images: int
    heldout_segments: int
    steps: int
    loss_first: float
    loss_last: float
    before: dict[str, float]
    after: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class SegmentSet:
    """Generated scenes prepared for an encoder. images: (N, S, S, 3) uint8; soft: (n, g, g) float32 cell
    coverage of each labelled segment; image_index: (n,) int64 image of each segment; classes: (n,) int64
    index into `class_names()`."""

    images: np.ndarray
    soft: np.ndarray
    image_index: np.ndarray
    classes: np.ndarray


def prepare_segments(corpus: CorpusConfig, split: str, spec: EncoderSpec) -> SegmentSet:
    """Every labelled segment of `split` of the generated corpus, prepared as `refbank build` prepares it."""
    names = class_names()
    images, soft, index, classes = [], [], [], []
    for _, scene, _ in iter_scenes(corpus, split):
        ids = sorted(scene.labels)  # every labelled instance keeps a visible area (make_scene), so covers a cell
        resized, cells = prepare_image(scene.image, [scene.instances == i for i in ids], spec)
        images.append(resized)
        soft.append(cells)
        index.extend([len(images) - 1] * len(ids))
        classes.extend(names.index(scene.labels[i]) for i in ids)
    return SegmentSet(np.stack(images), np.concatenate(soft), np.asarray(index, np.int64),
                      np.asarray(classes, np.int64))


def class_texts() -> list[tuple[int, str]]:
    """(class index, text) of every way the fit names a class: the label as the builder prompts it
    (TEXT_TEMPLATE), the bare label, and each caption phrase bare and prompted."""
    variants = class_phrases()
    texts = []
    for i, name in enumerate(class_names()):
        for text in (TEXT_TEMPLATE.format(name), name, *variants[name], *map(TEXT_TEMPLATE.format, variants[name])):
            texts.append((i, text))
    return list(dict.fromkeys(texts))


@torch.inference_mode()
def evaluate(encoder: Encoder, data: SegmentSet, batch_images: int = 32) -> dict[str, float]:
    """Held-out figures of `encoder` on `data`, segments embedded by the builder's `encode_batch`:
    segment_to_label_top1: share of segments whose nearest label text (TEXT_TEMPLATE) is their class;
    segment_to_phrase_top1: the same over every text of `class_texts()`;
    label_to_segment_r_precision: per class, the share of its R segments among the R nearest to its label
    text, averaged over classes (chance: the class's share of segments)."""
    names = class_names()
    visual = []
    for start in range(0, len(data.images), batch_images):
        rows = (data.image_index >= start) & (data.image_index < start + batch_images)
        batch = encode_batch(encoder, data.images[start:start + batch_images], data.soft[rows],
                             data.image_index[rows] - start, [None] * int(rows.sum()), {})
        visual.append(batch.visual.astype(np.float32))
    segments = np.concatenate(visual)
    labels = encoder.encode_text([TEXT_TEMPLATE.format(n) for n in names])
    texts = class_texts()
    phrases = encoder.encode_text([t for _, t in texts])
    phrase_class = np.asarray([c for c, _ in texts])
    by_label, by_phrase = segments @ labels.T, segments @ phrases.T
    precision = []
    for c in np.unique(data.classes):
        r = int((data.classes == c).sum())
        precision.append(float((data.classes[np.argsort(-by_label[:, c], kind="stable")[:r]] == c).mean()))
    return {"segment_to_label_top1": float((by_label.argmax(axis=1) == data.classes).mean()),
            "segment_to_phrase_top1": float((phrase_class[by_phrase.argmax(axis=1)] == data.classes).mean()),
            "label_to_segment_r_precision": float(np.mean(precision))}


def contrastive_loss(segments: torch.Tensor, texts: torch.Tensor, classes: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss with shared classes: (n, D) segments and (K, D) texts, L2-normalised, (n,) class of
    each segment (text k names class k). Segment → text: cross-entropy over the K texts; text → segment: for
    each class present, cross-entropy over the n segments against a target spread evenly over its segments."""
    logits = logit_scale * segments @ texts.T
    to_text = F.cross_entropy(logits, classes)
    present = torch.unique(classes)
    target = (classes[None, :] == present[:, None]).float()
    to_segment = -(F.log_softmax(logits[:, present].T, dim=1) * target / target.sum(1, keepdim=True)).sum(1).mean()
    return (to_text + to_segment) / 2


def _cell_loss(features: torch.Tensor, soft: torch.Tensor, local: torch.Tensor, classes: torch.Tensor,
               texts: torch.Tensor, logit_scale: torch.Tensor, min_cover: float = 0.9) -> torch.Tensor:
    """Segment → text cross-entropy of one-cell segments: each feature cell that a segment covers (almost) alone
    is pooled on its own, so every cell, not only whole segments, must name its class (query regions are
    superpixels, often a few cells). features (B, D, g, g); soft (n, g, g); local (n,) image of each segment."""
    segment, row, col = torch.nonzero(soft >= min_cover, as_tuple=True)
    if not len(segment):
        return features.sum() * 0.0
    cells = F.normalize(features[local[segment], :, row, col], dim=1)
    return F.cross_entropy(logit_scale * cells @ texts.T, classes[segment])


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch CPU threads, restoring the process's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _optimizer(model: torch.nn.Module, config: FitConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (weight decay on matrices only, not on embeddings, norms, biases or the logit scale) and its
    schedule: linear warm-up over `warmup_steps`, then cosine decay to 0 at `steps`."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        matrix = p.ndim >= 2 and "embedding" not in name
        (decay if matrix else plain).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": plain, "weight_decay": 0.0}], lr=config.learning_rate)

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train(model: torch.nn.Module, spec: EncoderSpec, data: SegmentSet, config: FitConfig) -> list[float]:
    """Fit `model` in place for `config.steps` steps; the loss of each step."""
    rng = np.random.default_rng(config.seed)
    device = next(model.parameters()).device
    texts = class_texts()
    tokens = open_clip.get_tokenizer(spec.architecture)([t for _, t in texts]).to(device)
    text_class = np.asarray([c for c, _ in texts])
    choices = [np.flatnonzero(text_class == c) for c in range(len(class_names()))]
    bounds = np.searchsorted(data.image_index, np.arange(len(data.images) + 1))  # image i: rows bounds[i]:bounds[i+1]
    usable = np.flatnonzero(np.diff(bounds) > 0)  # images with at least one labelled segment
    optimizer, schedule = _optimizer(model, config)
    order, losses = np.zeros(0, np.int64), []
    model.train()
    for _ in range(config.steps):
        if len(order) < config.batch_images:  # a new epoch: every image once, in a new order
            order = np.concatenate([order, rng.permutation(usable)])
        batch, order = order[:config.batch_images], order[config.batch_images:]
        rows = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in batch])
        local = np.repeat(np.arange(len(batch)), bounds[batch + 1] - bounds[batch])  # batch position of each row
        flip = rng.uniform(size=len(batch)) < 0.5  # mirror half the images, their masks with them
        images = np.where(flip[:, None, None, None], data.images[batch][:, :, ::-1], data.images[batch])
        soft = np.where(flip[local][:, None, None], data.soft[rows][:, :, ::-1], data.soft[rows])
        chosen = [int(rng.choice(c)) for c in choices]  # one way of naming each class this step
        features = dense_features(model.visual, pixels_to_tensor(images, spec, device))
        segments, _ = pool_tensors(features, torch.from_numpy(np.ascontiguousarray(soft)), torch.from_numpy(local))
        text = F.normalize(model.encode_text(tokens[chosen]), dim=-1)
        classes = torch.from_numpy(data.classes[rows]).to(device)
        scale = model.logit_scale.exp().clamp(max=100.0)
        loss = contrastive_loss(segments, text, classes, scale)
        if config.cell_weight:
            loss = loss + config.cell_weight * _cell_loss(features, torch.from_numpy(np.ascontiguousarray(soft)),
                                                          torch.from_numpy(local), classes, text, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save_checkpoint(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """The model's state dict as float16 safetensors (no pickle; open_clip loads it as a checkpoint path)."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # safetensors creates it owner-only; a checkpoint is shipped and shared
    tmp.replace(path)  # a crash never leaves a half-written checkpoint under the real name


def fit_encoder(out: str | Path, config: FitConfig = FitConfig()) -> FitReport:
    """Fit `config.encoder` on the generated `config.train` corpus, save it to `out` (.safetensors, float16) and
    its report next to it (`out` with suffix .json); returns the report."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"checkpoint path {str(out)!r} must end in .safetensors (the format it is written in)")
    seconds: dict[str, float] = {}
    with _torch_threads(config.threads):
        start = time.perf_counter()
        encoder = load_encoder(config.encoder)
        if encoder.spec.family != "open_clip" or encoder.spec.text_dim is None:
            raise ValueError(f"encoder {encoder.spec.name!r} is not an open_clip model with a text tower; "
                             "fitting aligns segments with text, so pick a CLIP entry (see `refbank encoders`)")
        train = prepare_segments(config.train, "train", encoder.spec)
        heldout = prepare_segments(config.heldout, "heldout", encoder.spec)
        seconds["prepare"] = time.perf_counter() - start
        before = evaluate(encoder, heldout)
        start = time.perf_counter()
        losses = _train(encoder.model, encoder.spec, train, config)
        seconds["train"] = time.perf_counter() - start
        record = config_to_dict(config)
        save_checkpoint(encoder.model, out, {"refbank_fit": json.dumps(record, sort_keys=True)})
        start = time.perf_counter()
        fitted = load_encoder(replace(config.encoder, weights=str(out)))  # the ordinary checkpoint path
        after = evaluate(fitted, heldout)
        seconds["evaluate"] = time.perf_counter() - start
    tenth = max(1, len(losses) // 10)
    report = FitReport(
        checkpoint=str(out), encoder=fitted.spec.to_dict(), train_images=len(train.images),
        train_segments=len(train.classes), heldout_images=len(heldout.images), heldout_segments=len(heldout.classes),
        steps=config.steps, loss_first=float(np.mean(losses[:tenth])), loss_last=float(np.mean(losses[-tenth:])),
        before=before, after=after, seconds={k: round(v, 1) for k, v in seconds.items()}, config=record)
    out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=1, sort_keys=True) + "\n")
    return report
