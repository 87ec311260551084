"""`refbank eval` (registered on jobs.cli.app): a thin layer over jobs.eval.evaluate. Failures are raised and
answered by jobs.group (one line, exit status as in jobs.errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from bank_builder.config import MaskKind
from jobs.cli import AS_JSON, ENDPOINT_URL, STORAGE_OPTION, VERBOSE, app, storage_options
from jobs.console import setup_logging, show


@app.command("eval")
def eval_cmd(
    bank: str = typer.Argument(..., help="Bank URI (built and indexed) to evaluate."),
    heldout: str = typer.Argument(..., help="Held-out labelled shards: a path or URL pattern with braces / globs."),
    more_banks: Optional[list[str]] = typer.Option(None, "--bank", help="Another bank with the same encoder, scored "
                                                   "with the same options in the same run (e.g. curated vs "
                                                   "uncurated); repeatable."),
    mode: Optional[list[str]] = typer.Option(None, help="Mode to score: vocabulary, open_set, foreground, "
                                             "reference (repeatable; default vocabulary and open_set)."),
    ablate: Optional[list[str]] = typer.Option(None, help="KEY=V1,V2: one more row per value on the first bank, only "
                                               "KEY changed; KEY: regions (superpixel, grid, hierarchy, refined), k, "
                                               "labels_per_class, prototypes, prototype_neighbours (repeatable)."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated class names (vocabulary and scored classes); "
                                          "default: the corpus's json `classes`, else the bank's labels."),
    mask_kind: MaskKind = typer.Option(MaskKind.AUTO, help="How to read the held-out masks."),
    max_images: Optional[int] = typer.Option(None, help="Score only the first N held-out images."),
    regions: str = typer.Option("superpixel", help="Base rows' regions: superpixel, grid, hierarchy or refined."),
    k: int = typer.Option(10, help="Neighbours of the open-set, foreground and reference kNN votes."),
    labels_per_class: int = typer.Option(3, help="Vocabulary: bank labels matched per class by text."),
    open_set_match: str = typer.Option("text", help="Open set: which bank labels' votes count for a class: 'text' "
                                       "(the labels vocabulary mode matches to it by text, so caption-phrase "
                                       "labels count) or 'exact' (only labels equal to the class name)."),
    open_set_unlabelled: str = typer.Option("ignore", help="Open set: votes of unlabelled bank segments (unpaired "
                                            "superpixels of a caption bank): 'ignore' (a region takes its best "
                                            "labelled vote) or 'vote' (they may win, predicting no class)."),
    prototypes: int = typer.Option(1, help="Vocabulary: prototypes per class (k-means of its nearest segments)."),
    prototype_neighbours: int = typer.Option(256, help="Vocabulary: segments clustered when --prototypes > 1."),
    oracle: bool = typer.Option(True, help="Add the oracle rows (ground-truth regions, nearest prototype) and the "
                                "region ceilings (each region its majority true class)."),
    short_side: Optional[int] = typer.Option(None, help="Resize images so the short side is this (mmseg test "
                                             "pipeline, e.g. 512 for ADE20K); predictions go back to the truth's size."),
    crop: Optional[int] = typer.Option(None, help="Sliding-window side in pixels (default: the whole image)."),
    stride: Optional[int] = typer.Option(None, help="Sliding-window stride (default: the crop)."),
    working_side: int = typer.Option(256, help="Long side at which regions are cut and pooled (RegionConfig)."),
    ignore_index: int = typer.Option(255, help="Class-mask value of unlabelled pixels (not scored)."),
    reduce_zero_label: bool = typer.Option(False, help="Class masks whose 0 means 'other': 0 is ignored, ids drop "
                                           "by one (not for `refbank convert` output, which is reduced already)."),
    background_threshold: Optional[float] = typer.Option(None, help="Vocabulary: pixels whose best cosine is below "
                                                         "this are --background-class (or no class)."),
    background_class: Optional[str] = typer.Option(None, help="The class below-threshold pixels take (e.g. VOC's "
                                                   "'background')."),
    reference_pool: int = typer.Option(16, help="Reference mode: the first N held-out images give the references."),
    reference_shots: int = typer.Option(1, help="Reference mode: references per class (its largest masks)."),
    reference_prompt: str = typer.Option("mask", help="Reference mode: 'mask' or 'box' prompts."),
    fpr: float = typer.Option(0.01, help="Reference mode: the calibration's false-positive rate (the "
                              "'calibrated' decision's threshold)."),
    reference_decision: str = typer.Option("margin", help="Reference mode: how 'exists' is decided: 'margin' (the "
                                           "best region's relative score ≥ --reference-margin) or 'calibrated' "
                                           "(a region above the fpr threshold and nearer the reference than any "
                                           "other bank label)."),
    reference_margin: float = typer.Option(0.1, help="Reference mode: relative-score margin of the 'margin' "
                                           "decision (cosine to the reference − cosine to the nearest other label)."),
    reference_recruit: float = typer.Option(0.5, help="Reference mode: weight of the reference's own bank labels' "
                                            "prototypes in its prototype, in [0, 1) (0 = the reference alone)."),
    pool_shots: bool = typer.Option(True, "--pool-shots/--each-shot", help="Reference mode: a class's shots make "
                                    "one prototype (their mean), or one prototype each (best one counts)."),
    foreground_threshold: float = typer.Option(0.5, help="Foreground mode: score threshold."),
    weights: Optional[str] = typer.Option(None, help="Checkpoint overriding the weights the bank records."),
    device: str = typer.Option("auto", help="Encoder device: auto, cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Folder for report.json and the plots (per-class IoU, confusion)."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = AS_JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Score retrieval segmentation on a labelled held-out corpus: mIoU, per-class IoU, pixel accuracy and a
    confusion matrix per mode; foreground IoU, F-measure, MAE; reference-mode precision of "no target"; with an
    oracle row and ablations in the same run (several banks, e.g. curated and uncurated, in one run with --bank).
    """
    from jobs.eval import EvalConfig, Protocol, ReferenceTrials, Variant, evaluate, parse_ablations
    from jobs.eval.run import save_report
    from query.windows import WindowConfig

    setup_logging(verbose)
    base = Variant(regions=regions, k=k, labels_per_class=labels_per_class, prototypes=prototypes,
                   prototype_neighbours=prototype_neighbours)
    config = EvalConfig(
        banks=(bank, *(more_banks or [])), heldout=heldout, modes=tuple(mode or ("vocabulary", "open_set")),
        mask_kind=mask_kind, classes=tuple(c.strip() for c in classes.split(",")) if classes else None,
        max_images=max_images, base=base, ablations=parse_ablations(ablate or [], base), oracle=oracle,
        protocol=Protocol(windows=WindowConfig(short_side, crop, stride), working_side=working_side,
                          ignore_index=ignore_index, reduce_zero_label=reduce_zero_label,
                          background_threshold=background_threshold, background_class=background_class),
        reference=ReferenceTrials(pool_images=reference_pool, shots=reference_shots, prompt=reference_prompt,
                                  fpr=fpr, decision=reference_decision, margin=reference_margin,
                                  recruit=reference_recruit, pool_shots=pool_shots),
        foreground_threshold=foreground_threshold, weights=weights, open_set_match=open_set_match,
        open_set_unlabelled=open_set_unlabelled, device=device,
        storage_options=storage_options(storage_option, endpoint_url))
    report = evaluate(config)
    if out is not None:
        save_report(report, out)
    show(report, as_json, format_report)


def format_report(report: Any) -> str:
    """The report as one line per row and mode, then what the encoder is and where the files went."""
    lines = [f"eval      {report.heldout['images']} held-out images of {report.heldout['shards']} "
             f"({len(report.heldout['classes'])} classes, {report.heldout['rejects']['count']} rejects), "
             f"{len(report.banks)} bank(s), {report.seconds:.0f} s"]
    for row in report.rows:
        for mode, m in row["modes"].items():
            lines.append(f"{row['name']:22s} {mode:10s} {_metrics(mode, m)}")
    for row in report.rows:
        if row["kind"] == "bank" and "vocabulary" in row["modes"]:
            ratio = report.oracle_ratio(row["name"])
            if ratio is not None:
                lines.append(f"ratio     {row['name']}: vocabulary mIoU / oracle = {ratio:.3f}")
    encoder = report.encoder
    if encoder.get("untrained"):
        lines.append("WARNING   encoder weights are UNTRAINED: these figures measure the plumbing, not a model")
    if encoder.get("note"):
        lines.append(f"NOTE      {encoder['note']}")
    lines += [f"note      {n}" for n in report.notes] + [f"plot      {p}" for p in report.plots]
    return "\n".join(lines)


def _metrics(mode: str, m: dict[str, Any]) -> str:
    if mode in ("vocabulary", "open_set"):
        return f"mIoU {_f(m['miou'])}  aAcc {_f(m['pixel_accuracy'])}  mAcc {_f(m['mean_accuracy'])}"
    if mode == "foreground":
        return f"IoU {_f(m['iou'])}  F {_f(m['f_measure'])}  MAE {_f(m['mae'])}"
    return (f"no-target precision {_f(m['no_target_precision'])} recall {_f(m['no_target_recall'])}  accuracy "
            f"{_f(m['accuracy'])}  IoU(present) {_f(m['iou_present'])}  ({m['trials']} trials)")


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
