"""The figures of the cluster reports (matplotlib, Agg backend): cluster image grids, agreement
with known labels, and the cluster-size / margin histograms."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unicom.io import write_png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grid(
    rows: Sequence[tuple[int, int, Sequence[tuple[bytes, str]]]], columns: int, path: str | Path
) -> None:
    """One row per cluster: (cluster, size, [(image bytes, caption), ...])."""

    plt = _pyplot()
    n_rows = max(len(rows), 1)
    fig, axes = plt.subplots(
        n_rows, columns, figsize=(2.1 * columns + 0.4, 2.5 * n_rows), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for r, (cluster, size, samples) in enumerate(rows):
        axes[r, 0].text(
            -0.06,
            0.5,
            f"cluster {cluster}\n({size} samples)",
            rotation=90,
            transform=axes[r, 0].transAxes,
            ha="right",
            va="center",
            fontsize=9,
            fontweight="bold",
        )
        for c, (image, caption) in enumerate(samples):
            ax = axes[r, c]
            ax.imshow(Image.open(io.BytesIO(image)).convert("RGB"))
            text = "\n".join(textwrap.wrap(caption, 32, max_lines=3, placeholder=" ..."))
            ax.set_title(text, fontsize=6)
    fig.suptitle("pseudo-classes: random clusters, random members (seeded)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    write_png(path, fig, 90)


def plot_note(note: str, path: str | Path) -> None:
    """A small PNG that says why there is no chart (no labels)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(note, 70)), ha="center", va="center", fontsize=9)
    write_png(path, fig, 90)


def plot_agreement(report: Mapping[str, Any], label_columns: Sequence[str], path: str | Path):
    plt = _pyplot()
    names = list(report)
    fig, axes = plt.subplots(
        1,
        max(len(label_columns), 1),
        figsize=(4.5 * max(len(label_columns), 1), 3.6),
        squeeze=False,
    )
    for ax, column in zip(axes[0], label_columns, strict=False):
        x = np.arange(len(names))
        for offset, metric in ((-0.2, "nmi"), (0.2, "ari")):
            values = [report[n][column][metric] for n in names]
            bars = ax.bar(x + offset, values, 0.4, label=metric.upper())
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(x, names)
        ax.set(ylim=(0, 1.15), title=f"agreement with '{column}'")
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    write_png(path, fig, 90)
