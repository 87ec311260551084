"""The `refbank` command line: a thin layer over the library's jobs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from bank_builder.config import EncoderConfig, MaskKind
from jobs.console import setup_logging, show
from jobs.errors import EXIT_STATUS_HELP
from jobs.group import RefbankGroup

app = typer.Typer(
    cls=RefbankGroup,
    add_completion=False,
    no_args_is_help=True,
    help="Build reference banks of segment embeddings from WebDataset image+mask corpora, and serve them. Every "
    "command reads its options from --config FILE (YAML or JSON; keys are option names, e.g. mask_kind) as well "
    "as from flags, which win.",
    epilog=EXIT_STATUS_HELP,
)

# Options several commands share, declared once.
STORAGE_OPTION = typer.Option(None, help="fsspec storage option KEY=VALUE for s3:// URLs (repeatable), "
                              "e.g. endpoint_url=http://127.0.0.1:9000.")
ENDPOINT_URL = typer.Option(None, envvar="REFBANK_S3_ENDPOINT", help="S3 endpoint URL.")
RAY_ADDRESS = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster address; default: a local Ray.")
AS_JSON = typer.Option(False, "--json", help="Print the report as JSON on stdout (an error too: {error, detail, "
                       "exit_code}).")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Log stage details, library and Ray messages, and the "
                       "traceback of an error.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"refbank {version('refbank')}")
        except PackageNotFoundError:
            typer.echo("refbank (not installed: no version)")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print refbank's version and exit.")) -> None:
    """Build reference banks of segment embeddings from WebDataset image+mask corpora, and serve them."""


def storage_options(items: list[str] | None, endpoint_url: str | None) -> dict[str, str]:
    """Parse repeated KEY=VALUE options into an fsspec storage-options dict."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--storage-option")
        options[key] = value
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    return options


def connect_ray(ray_address: str | None) -> None:
    """Connect to the Ray cluster at `ray_address`; without one the job starts a local Ray once its options
    are checked (so a bad option fails in milliseconds)."""
    if ray_address:
        from bank_builder.ray_runtime import init_ray

        init_ray(ray_address)


@app.command("make-corpus")
def make_corpus_cmd(
    out: str = typer.Argument(..., help="Where to write the shards: a local directory or s3://bucket/prefix."),
    shards: int = typer.Option(4, help="Number of training shards."),
    samples_per_shard: int = typer.Option(32, help="Samples (images) per shard."),
    image_size: int = typer.Option(256, help="Image side in pixels (square images)."),
    mask_kind: MaskKind = typer.Option(MaskKind.INSTANCE, help="Mask format written with each image."),
    image_format: str = typer.Option("jpg", help="Image encoding: jpg or png."),
    heldout_shards: int = typer.Option(0, help="Extra held-out shards (heldout-*.tar) for evaluation."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes byte-identical shards."),
    captions: bool = typer.Option(False, "--captions", help="Write noisy captions: varied phrases per class, with "
                                  "the wrong / missing rates below; the truth goes in the json's caption_truth."),
    wrong_phrase_rate: float = typer.Option(0.0, help="With --captions: chance that a phrase names a class absent "
                                            "from the image instead of the one present."),
    missing_phrase_rate: float = typer.Option(0.0, help="With --captions: chance that a class present is not named."),
    wrong_label_rate: float = typer.Option(0.0, help="Chance that a training instance's label names another class "
                                           "(instance and rle masks), to score curation; the truth goes in the "
                                           "json's label_truth. Held-out labels stay true."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = AS_JSON,
) -> None:
    """Write a synthetic, seeded WebDataset image+mask corpus (scenes cut from scikit-image's photos)."""
    from bank_builder.synthetic import CorpusConfig, make_corpus

    config = CorpusConfig(shards=shards, samples_per_shard=samples_per_shard, image_size=image_size,
                          mask_kind=mask_kind, image_format=image_format, heldout_shards=heldout_shards, seed=seed,
                          captions=captions, wrong_phrase_rate=wrong_phrase_rate,
                          missing_phrase_rate=missing_phrase_rate, wrong_label_rate=wrong_label_rate)
    show(make_corpus(out, config, storage_options(storage_option, endpoint_url)), as_json, lambda summary: (
        f"wrote {len(summary.shards)} shards + {len(summary.heldout)} held-out, {summary.samples} samples, "
        f"{summary.segments} segments to {out}"))


@app.command("convert")
def convert_cmd(
    dataset: str = typer.Argument(..., help="Dataset layout: ade20k, coco-stuff, voc, pascal-context (59 classes) "
                                  "or pascal-context-60."),
    root: Path = typer.Argument(..., help="The dataset folder, e.g. ADEChallengeData2016, coco_stuff164k, "
                                "VOCdevkit/VOC2012, VOCdevkit/VOC2010."),
    out: str = typer.Argument(..., help="Where to write the shards: a local directory or s3://bucket/prefix."),
    split: str = typer.Option(..., help="The dataset's name of the split to convert (validation, val2017, val...)."),
    samples_per_shard: int = typer.Option(1000, help="Images per tar shard."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = AS_JSON,
) -> None:
    """Convert a segmentation dataset's released layout into refbank's corpus shards (image + class mask + json).

    Build a bank from them with `refbank build '<out>/*.tar' <bank>` (the masks are read as class masks). Images
    without a usable mask are skipped and counted.
    """
    from bank_builder.convert import ConvertConfig, convert

    report = convert(root, out, ConvertConfig(dataset=dataset, split=split, samples_per_shard=samples_per_shard),
                     storage_options(storage_option, endpoint_url))
    skipped = ", ".join(f"{n} {reason} (e.g. {report.examples[reason]})" for reason, n in report.skipped.items())
    show(report, as_json, lambda r: f"wrote {len(r.shards)} shards, {r.samples} samples of {r.dataset} {r.split} "
         f"({r.classes} classes) to {out}" + (f"; skipped {skipped}" if skipped else ""))


@app.command("fit-encoder")
def fit_encoder_cmd(
    out: Path = typer.Argument(..., help="Checkpoint to write (.safetensors); its report goes next to it (.json)."),
    encoder: str = typer.Option("synthetic-clip", help="open_clip registry entry to fit (see `refbank encoders`)."),
    weights: str = typer.Option("untrained", help="Starting weights: 'untrained' (seeded), 'pretrained' or a "
                                "checkpoint path."),
    seed: int = typer.Option(0, help="Seed of untrained starting weights, batch order, flips and text variants."),
    train_images: int = typer.Option(1536, help="Generated training images (multiple of 64)."),
    steps: int = typer.Option(1000, help="Optimiser steps."),
    batch_images: int = typer.Option(32, help="Images per step."),
    threads: int = typer.Option(1, help="torch CPU threads. 1 is the default because on a shared machine two "
                                "threads per process ran several times slower (see docs/ENCODER_FIT.md)."),
    as_json: bool = AS_JSON,
) -> None:
    """Fit an open_clip encoder on generated scenes (contrastive: mask-pooled segments vs label / phrase text).

    The result is a STAND-IN for this project's generated data, not a model for real images. The package ships
    one (`synthetic-clip`, used by `refbank demo`); this command reproduces it from its seeds.
    """
    from bank_builder.encoders.fit import FitConfig, fit_encoder

    setup_logging(False)
    defaults = FitConfig()
    shards = max(1, train_images // defaults.train.samples_per_shard)
    config = FitConfig(encoder=EncoderConfig(name=encoder, weights=weights, seed=seed, device="cpu"),
                       train=replace(defaults.train, shards=shards), steps=steps, batch_images=batch_images,
                       seed=seed, threads=threads)
    show(fit_encoder(out, config), as_json, _fit_text)


def _fit_text(report) -> str:
    lines = [f"checkpoint {report.checkpoint} ({report.steps} steps, {report.train_images} images, "
             f"{report.train_segments} segments; loss {report.loss_first:.3f} → {report.loss_last:.3f})",
             f"time       " + ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items())]
    for name in report.after:
        lines.append(f"held-out   {name}: {report.before[name]:.3f} before → {report.after[name]:.3f} after "
                     f"({report.heldout_segments} segments)")
    lines.append(f"NOTE       {report.encoder.get('note') or 'fitted on generated scenes only'}")
    return "\n".join(lines)


_ENCODER_FIELDS = ("name", "family", "architecture", "pretrained", "image_size", "patch_size", "visual_dim",
                   "text_dim", "note")


@app.command("encoders")
def encoders_cmd(as_json: bool = AS_JSON) -> None:
    """List the encoder registry: name, family, architecture, pretrained weights, input size, dims."""
    from bank_builder.encoders import get_encoder_entry, list_encoders

    entries = [{k: get_encoder_entry(name).get(k) for k in _ENCODER_FIELDS} for name in list_encoders()]
    show(entries, as_json, lambda es: "\n".join(
        f"{e['name']:16s} {e['family']:9s} {e['architecture']:34s} pretrained={e['pretrained']} "
        f"image={e['image_size']} patch={e['patch_size']} dims={e['visual_dim']}/{e['text_dim']}"
        + (f"\n{'':16s} NOTE: {e['note']}" if e["note"] else "") for e in es))


@app.command("serve")
def serve_cmd(
    bank: str = typer.Argument(..., help="Bank URI to serve (local dir or s3://...); it must have an index."),
    version: Optional[str] = typer.Option(None, help="Bank version; default: CURRENT."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    cache_dir: Optional[Path] = typer.Option(None, help="Local disk tier of the list cache: lists fetched from the "
                                             "bank are kept here by content (and survive restarts)."),
    disk_cache_mb: int = typer.Option(4096, help="Byte limit of --cache-dir, MiB (least recently used go first)."),
    prefetch: bool = typer.Option(False, help="After the bank opens, fill the free memory budget in the background "
                                  "with the lists earlier runs probed most (counts kept in --cache-dir), else "
                                  "the largest; requests always go first."),
    memory_mb: int = typer.Option(1024, help="Memory budget of resident inverted lists, MiB. Lists are fetched by byte "
                                  "range when a query first probes them; when the whole index fits nothing is ever "
                                  "evicted, otherwise lists are evicted (2Q: lists seen once go first) to make room."),
    weights: Optional[str] = typer.Option(None, help="Checkpoint path overriding the weights the bank records."),
    token: Optional[str] = typer.Option(None, envvar="REFBANK_TOKEN", help="Require this bearer token on /v1 and /admin."),
    follow: bool = typer.Option(False, help="Follow CURRENT: when another version is published (build, index, "
                                "remove, compact), switch to it without dropping a request."),
    poll_seconds: float = typer.Option(5.0, help="With --follow: how often CURRENT is read."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line on stdout once the bank is loaded and "
                                 "the port listens: {event: listening, url, bank, version, segments, encoder, "
                                 "untrained} (an error instead: {error, detail, exit_code})."),
    verbose: bool = VERBOSE,
) -> None:
    """Serve a bank over HTTP: /v1/segment, /v1/search, /v1/bank, /metrics, /docs, and a page at /.

    Checks the bank (it exists, a version has an index) before loading the encoder the bank was built with
    (refusing a mismatch); then loads inverted lists on demand. --port 0 takes a free port (the URL is logged,
    and printed with --json).
    """
    from query.service import serve
    from query.serving import ServiceConfig

    setup_logging(verbose, service=True)
    serve(ServiceConfig(bank=bank, version=version, storage_options=storage_options(storage_option, endpoint_url),
                        cache_dir=str(cache_dir) if cache_dir else None, disk_bytes=disk_cache_mb << 20,
                        prefetch=prefetch, memory_bytes=memory_mb << 20, weights=weights, token=token,
                        follow_seconds=poll_seconds if follow else None), host=host, port=port,
          on_listening=_print_listening if as_json else None)


def _print_listening(url: str, snapshot) -> None:
    """The --json startup line of `refbank serve`."""
    spec = snapshot.bank.manifest.encoder
    typer.echo(json.dumps({"event": "listening", "url": url, "bank": str(snapshot.bank.ref),
                           "version": snapshot.bank.version, "segments": snapshot.bank.manifest.totals["segments"],
                           "encoder": spec["name"], "untrained": bool(spec.get("untrained"))}))


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path("demo-out"), help="Directory for the generated corpus and the bank."),
    encoder: str = typer.Option("synthetic-clip", help="Encoder registry entry. The default is the stand-in fitted "
                                "on generated scenes (shipped checkpoint); other entries run with untrained seeded "
                                "weights unless --weights says otherwise."),
    weights: Optional[str] = typer.Option(None, help="'untrained', 'pretrained' or a checkpoint path; default: the "
                                          "shipped stand-in for synthetic-clip, untrained for any other entry."),
    shards: int = typer.Option(4, help="Corpus shards."),
    samples_per_shard: int = typer.Option(24, help="Samples per shard."),
) -> None:
    """The main job end to end on embedded defaults: corpus, bank, index, HTTP service, held-out segmentation."""
    from jobs.demo import DemoConfig, run_demo

    setup_logging(False)
    raise typer.Exit(run_demo(DemoConfig(workdir=workdir, encoder=encoder, weights=weights, shards=shards,
                                         samples_per_shard=samples_per_shard)))


import jobs.build_cli  # noqa: E402,F401 - registers build and index on `app`
import jobs.lifecycle_cli  # noqa: E402,F401 - registers info, remove, compact, gc, pin, unpin on `app`
import jobs.curate_cli  # noqa: E402,F401 - registers curate on `app`
import jobs.eval_cli  # noqa: E402,F401 - registers eval on `app`

if __name__ == "__main__":  # `python -m jobs.cli ...` runs the CLI as `refbank ...` does
    # Run as a script this module is `__main__`, while the modules above registered their commands on the app
    # of `jobs.cli`, a second copy of it: run that one.
    from jobs.cli import app as registered

    registered()
