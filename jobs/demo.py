"""The README's main job on embedded defaults: corpus → bank → index → HTTP service → segment held-out images."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from bank_builder.config import BuildConfig, EncoderConfig, IngestConfig
from bank_builder.encoders import resolve_spec
from bank_builder.encoders.fit import SHIPPED_CHECKPOINT
from bank_builder.index.params import IndexConfig
from bank_builder.ingest import iter_samples
from bank_builder.records import Sample
from bank_builder.synthetic import CorpusConfig, class_names, make_corpus, make_scene
from jobs.evaluate import class_map, mean_iou
from query.render import legend_png

EXAMPLES_SEED = 4  # the page's examples (query/static/examples): three backgrounds, 3-4 classes each


STANDIN_ENCODER = "synthetic-clip"  # the registry entry SHIPPED_CHECKPOINT belongs to


@dataclass(frozen=True)
class DemoConfig:
    """Where the demo writes, how big its corpus is, how many held-out images it segments, and the encoder:
    weights None = the stand-in checkpoint shipped for synthetic-clip (fitted on generated scenes, see
    bank_builder.encoders.fit), seeded untrained weights for any other entry."""

    workdir: Path = Path("demo-out")
    encoder: str = STANDIN_ENCODER
    weights: str | None = None
    shards: int = 4
    samples_per_shard: int = 24
    image_size: int = 256
    segment_images: int = 8


@contextmanager
def local_service(bank: str, cache_dir: Path) -> Iterator[str]:
    """The query service on 127.0.0.1 (a free port) in a background thread; yields its base URL."""
    import uvicorn

    from query.service import create_app
    from query.serving import ServiceConfig

    app = create_app(ServiceConfig(bank=bank, cache_dir=str(cache_dir)))
    app.state.service.load()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def segment_heldout(url: str, samples: list[Sample], out: Path, token: str | None = None) -> dict:
    """Segment `samples` over HTTP in vocabulary mode; writes overlays with a legend panel (label → colour, also
    as JSON in the PNG's text chunk query.render.LEGEND_KEY); returns mIoU and latencies."""
    from query.client import RefbankClient

    client, names = RefbankClient(url, token=token), list(class_names())
    out.mkdir(parents=True, exist_ok=True)
    predictions, truths, seconds = [], [], []
    for sample in samples:
        png = io.BytesIO()
        Image.fromarray(sample.image).save(png, format="PNG")
        start = time.perf_counter()
        answer = client.segment(png.getvalue(), mode="vocabulary", classes=names,
                                return_=["json", "label_map", "overlay"])
        seconds.append(time.perf_counter() - start)
        (out / f"{sample.key.rsplit('/', 1)[-1]}.overlay.png").write_bytes(legend_png(answer["overlay"],
                                                                                     answer["legend"]))
        predictions.append(_label_indices(answer, names))
        truths.append(class_map(sample, names))
    return {"images": len(samples), "miou": mean_iou(predictions, truths, len(names)),
            "p50_ms": 1000 * float(np.median(seconds)), "max_ms": 1000 * max(seconds)}


def write_examples(directory: Path, count: int = 3, image_size: int = 128, seed: int = EXAMPLES_SEED) -> list[dict]:
    """The page's example images: `count` synthetic scenes (the corpus generator, fixed seed) as PNGs in
    `directory`, listed with the classes each shows in examples.json; returns that list. The shipped ones:
    `python -c "from pathlib import Path; from jobs.demo import *; write_examples(Path('query/static/examples'))"`."""
    directory.mkdir(parents=True, exist_ok=True)
    listed = []
    for i in range(count):
        scene = make_scene(np.random.default_rng([seed, i]), image_size, min_objects=2, max_objects=4)
        name = f"scene-{i + 1}.png"
        Image.fromarray(scene.image).save(directory / name, format="PNG", optimize=True)
        listed.append({"file": name, "classes": sorted(set(scene.labels.values()))})
    (directory / "examples.json").write_text(json.dumps(listed, indent=1) + "\n")
    return listed


def _label_indices(answer: dict, names: list[str]) -> np.ndarray:
    """The answer's label map (1 + index into its own class list) re-indexed into `names`."""
    lookup = np.array([0] + [names.index(c) + 1 if c in names else 0 for c in answer["result"]["classes"]])
    return lookup[answer["label_map"].astype(np.int64)]


def demo_encoder(config: DemoConfig) -> EncoderConfig:
    """The encoder the demo builds and queries with (see DemoConfig.weights)."""
    weights = config.weights or (str(SHIPPED_CHECKPOINT) if config.encoder == STANDIN_ENCODER else "untrained")
    return EncoderConfig(name=config.encoder, weights=weights, seed=0)


def run_demo(config: DemoConfig) -> int:
    """Run every stage in order with console output; returns the process exit status."""
    from jobs.build_cli import run_build, run_index

    started, corpus = time.perf_counter(), config.workdir / "corpus"
    summary = make_corpus(str(corpus), CorpusConfig(shards=config.shards, samples_per_shard=config.samples_per_shard,
                                                    image_size=config.image_size, heldout_shards=1, seed=0))
    print(f"corpus    {len(summary.shards)} shards + {len(summary.heldout)} held-out, {summary.samples} images, "
          f"{summary.segments} segments in {corpus}")
    bank = str(config.workdir / "bank")
    encoder = demo_encoder(config)
    build = BuildConfig(source=str(corpus / "train-*.tar"), bank=bank, encoder=encoder)
    status = run_build(build, None, as_json=False) or run_index(bank, IndexConfig(), {}, None, as_json=False)
    if status:
        return status
    heldout = [s for s in iter_samples(summary.heldout[0], IngestConfig()) if isinstance(s, Sample)]
    with local_service(bank, config.workdir / "list-cache") as url:
        print(f"service   {url} (bank {bank}); page at {url}/")
        result = segment_heldout(url, heldout[: config.segment_images], config.workdir / "overlays")
    print(f"segment   {result['images']} held-out images over HTTP, vocabulary of {len(class_names())} classes: "
          f"mIoU {result['miou']:.3f}, p50 {result['p50_ms']:.0f} ms, max {result['max_ms']:.0f} ms; overlays in "
          f"{config.workdir / 'overlays'}")
    print(f"browse    refbank serve {bank}   # then open http://127.0.0.1:8000/ (page, /docs)")
    spec = resolve_spec(encoder)
    what = ("untrained encoder: the mIoU measures the plumbing, not a model" if spec.untrained else
            f"{spec.name}: {spec.note}" if spec.note else f"{spec.name}, weights {spec.weights}")
    print(f"total     {time.perf_counter() - started:.0f} s ({what})")
    return 0
