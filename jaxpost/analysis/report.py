"""The analysis' files: CSV tables, PNG plots (matplotlib, Agg backend) and summary.md.

Every figure has the fixed size `FIGSIZE` at `DPI` (900 x 500 pixels), whatever the
model's depth, so reports of different runs line up. Heatmaps are module x layer of one
checkpoint (layer-stack tensors; those outside the stack are in the tables); line plots
show a metric against the checkpoint step, one panel per series (a workdir, or an HF
folder as a single point).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxpost.analysis.weights import module_sort_key

FIGSIZE = (9.0, 5.0)  # inches
DPI = 100  # so every PNG is 900 x 500 pixels


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Rows (dicts) as CSV with `columns` in that order; None is written as empty."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else _fmt(r.get(c)) for c in columns])


def _fmt(x: Any) -> Any:
    if isinstance(x, float):
        return f"{x:.6g}"
    return x


def file_stem(label: str) -> str:
    """A file-name-safe form of a checkpoint label (`run@200` -> `run_200`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "checkpoint"


def heatmap(path: str, rows: Sequence[Mapping[str, Any]], value: str, title: str,
            cmap: str = "viridis") -> bool:
    """Module x layer heatmap of `value` over the layer-stack rows of one checkpoint.
    Returns False (and writes nothing) if there are no layer rows."""
    cells = [r for r in rows if r["layer"] is not None]
    if not cells:
        return False
    modules = sorted({r["module"] for r in cells}, key=module_sort_key)
    layers = sorted({r["layer"] for r in cells})
    grid = np.full((len(modules), len(layers)), np.nan)
    for r in cells:
        grid[modules.index(r["module"]), layers.index(r["layer"])] = r[value]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(modules)), modules, fontsize=8)
    step = max(1, len(layers) // 16)
    ax.set_xticks(range(0, len(layers), step), [str(x) for x in layers[::step]], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=value)
    fig.subplots_adjust(left=0.2, right=0.97, bottom=0.12, top=0.9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def line_panels(path: str, series: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
                ylabel: str, title: str, log: bool = False) -> None:
    """One panel per series: a line per key (module, or one "KL" line) of (x, y) points."""
    plt = _pyplot()
    names = list(series)
    cols = min(len(names), 3) or 1
    nrows = math.ceil(max(len(names), 1) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=FIGSIZE, dpi=DPI, squeeze=False,
                             sharey=True)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        for key in sorted(series[name], key=module_sort_key):
            pts = sorted(series[name][key])
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=key)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if log:
            ax.set_yscale("symlog", linthresh=1e-4)
    axes.flat[0].set_ylabel(ylabel, fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="center right", fontsize=7)
        fig.subplots_adjust(right=0.82)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.09, bottom=0.11, top=0.86, hspace=0.45, wspace=0.12)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


__all__ = ["DPI", "FIGSIZE", "file_stem", "heatmap", "line_panels", "write_csv"]
