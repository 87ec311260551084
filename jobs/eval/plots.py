"""Plots of an evaluation report: per-class IoU bars (each bank's base row and its oracle, side by side) and a
row-normalised confusion matrix per bank row, for the vocabulary and open-set modes. matplotlib is optional
(`pip install 'refbank[eval]'`): without it `write_plots` raises PlotsUnavailable and the report says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PIXEL_MODES = ("vocabulary", "open_set")


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def write_plots(report: Any, out: Path) -> list[str]:
    """Write the report's plots under `out` (PNG); returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotsUnavailable("plots need matplotlib: pip install 'refbank[eval]' (or matplotlib); the JSON "
                               "report is complete without them") from None
    out.mkdir(parents=True, exist_ok=True)
    classes = report.heldout["classes"]
    written = []
    for mode in PIXEL_MODES:
        shown = [r for r in report.rows if r["kind"] in ("bank", "oracle") and mode in r["modes"]]
        if not shown:
            continue
        written.append(_iou_bars(plt, shown, mode, classes, out / f"per_class_iou_{mode}.png"))
        for row in (r for r in shown if r["kind"] == "bank"):
            written.append(_confusion(plt, row, mode, classes, out / f"confusion_{_slug(row['name'])}_{mode}.png"))
    return written


def _iou_bars(plt: Any, rows: list[dict[str, Any]], mode: str, classes: list[str], path: Path) -> str:
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(classes) * len(rows) + 2), 4))
    x = np.arange(len(classes))
    for i, row in enumerate(rows):
        per_class = row["modes"][mode]["per_class_iou"]
        values = [np.nan if per_class[c] is None else per_class[c] for c in classes]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width,
               label=f"{row['name']} (mIoU {row['modes'][mode]['miou']:.3f})")
    ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.set_title(f"per-class IoU, {mode} mode")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def _confusion(plt: Any, row: dict[str, Any], mode: str, classes: list[str], path: Path) -> str:
    matrix = np.asarray(row["modes"][mode]["confusion"], dtype=np.float64)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = max(5.0, 0.3 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(shares, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(np.arange(len(classes) + 1), [*classes, "(none)"], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion ({row['name']}, {mode}), rows sum to 1")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def _slug(name: str) -> str:
    """A file-name-safe version of a row name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
