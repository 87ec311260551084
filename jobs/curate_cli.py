"""`refbank curate` (registered on jobs.cli.app): ReME-style curation of a bank's CURRENT version, a thin layer over
bank_builder.curate.curate_bank. Publishes through the same compare-and-swap as every writer. Failures are raised
and answered by jobs.group (one line, exit status as in jobs.errors).
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from jobs.cli import AS_JSON, ENDPOINT_URL, RAY_ADDRESS, STORAGE_OPTION, VERBOSE, app, connect_ray, storage_options
from jobs.console import setup_logging, show

SHOWN_LABELS = 40  # labels the text report lists (the JSON report and `refbank info --json` have all)


@app.command("curate")
def curate_cmd(
    bank: str = typer.Argument(..., help="Bank URI whose CURRENT version to curate (local dir or s3://...)."),
    outlier_z: float = typer.Option(3.0, help="Drop a segment whose cosine to its label's group centroid lies this "
                                    "many robust standard deviations (1.4826 x MAD) below the group's median."),
    no_outliers: bool = typer.Option(False, "--no-outliers", help="No outlier filtering (scores still computed)."),
    refine_rounds: int = typer.Option(0, help="Times a group's centroid is computed again over the members kept."),
    min_group: int = typer.Option(8, help="Groups smaller than this are scored, not filtered."),
    confusion_margin: Optional[float] = typer.Option(
        None, help="Also drop a segment nearer another label's centroid than its own by more than this cosine "
        "(labels whose centroids lie within --synonym-cosine of its own do not count)."),
    synonym_cosine: float = typer.Option(0.9, help="Centroids this similar count as one concept (phrase variants)."),
    duplicate_cosine: float = typer.Option(0.99, help="Of two kept segments of one label this similar (in one row "
                                           "group of a part), keep the better-scored one."),
    no_duplicates: bool = typer.Option(False, "--no-duplicates", help="No near-duplicate removal."),
    keep_unpaired: bool = typer.Option(False, "--keep-unpaired", help="Keep segments without a label (ReME drops "
                                       "them: no phrase was paired with them)."),
    ray_address: Optional[str] = RAY_ADDRESS,
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = AS_JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Curate a bank (ReME-style): drop unpaired segments, segments that disagree with their label's group, and
    near-duplicates; score every segment. Dropped segments stay in the parts with keep = false and a reason; the
    next `refbank index` takes kept segments only. Publishes the next version; prints a per-label report."""
    from bank_builder.curate import CurationConfig, curate_bank

    setup_logging(verbose)
    config = CurationConfig(drop_unpaired=not keep_unpaired, outlier_z=None if no_outliers else outlier_z,
                            refine_rounds=refine_rounds, min_group=min_group, confusion_margin=confusion_margin,
                            synonym_cosine=synonym_cosine, duplicate_cosine=None if no_duplicates else duplicate_cosine)
    connect_ray(ray_address)
    show(curate_bank(bank, config, storage_options(storage_option, endpoint_url)), as_json, curate_text)


def curate_text(report: Any) -> str:
    """Human-readable summary of a CurationReport."""
    state = f"published version {report.version}" if report.version else "same decisions as before, nothing published"
    reasons = ", ".join(f"{k} {v}" for k, v in report.dropped_by_reason.items()) or "none"
    lines = [f"curate    {report.bank} {report.parent}: {state}",
             f"kept      {report.kept} of {report.segments} segments; dropped {report.dropped} ({reasons})",
             f"{'label':24s} {'segments':>8s} {'kept':>6s} {'mean sim':>8s} {'cut':>6s}  dropped"]
    lines += [label_line(entry) for entry in report.labels[:SHOWN_LABELS]]
    if len(report.labels) > SHOWN_LABELS:
        lines.append(f"... {len(report.labels) - SHOWN_LABELS} more labels (--json lists them all)")
    lines.append("next      refbank index (takes kept segments only)")
    return "\n".join(lines)


def label_line(entry: dict[str, Any]) -> str:
    """One label of a curation report as a table row."""
    mean = f"{entry['mean_similarity']:.3f}" if entry["mean_similarity"] is not None else "-"
    cut = f"{entry['cut']:.3f}" if entry["cut"] is not None else "-"
    dropped = ", ".join(f"{k} {v}" for k, v in entry["dropped"].items()) or "-"
    return f"{entry['label'][:24]:24s} {entry['segments']:8d} {entry['kept']:6d} {mean:>8s} {cut:>6s}  {dropped}"


def curation_lines(info: dict[str, Any]) -> list[str]:
    """The curation lines of `refbank info`'s text output."""
    c = info.get("curation")
    if c is None:
        return ["curation  none (run `refbank curate`)"]
    reasons = ", ".join(f"{k} {v}" for k, v in c["dropped_by_reason"].items()) or "none"
    return [f"curation  {c['kept']} kept, {c['dropped']} dropped ({reasons}); {c['parts_curated']} parts curated, "
            f"{c['parts_not_curated']} not; index {'follows it' if c['index_follows'] else 'NOT rebuilt since'}"]
