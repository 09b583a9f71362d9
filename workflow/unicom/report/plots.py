"""Plots for the report: download accounting, k-means objective, training curves, retrieval bars."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from unicom import formats  # noqa: E402
from unicom.cli import run_cli, setup_logging  # noqa: E402
from unicom.io import write_png  # noqa: E402


def _save(fig, path: str) -> None:
    fig.tight_layout()
    write_png(path, fig, 110)


def plot_download(summary: dict, path: str) -> None:
    counts = summary["counts"]
    fig, ax = plt.subplots(figsize=(6, 3))
    bars = ax.barh(list(counts), list(counts.values()), color="tab:blue")
    ax.bar_label(bars)
    ax.set_xlabel("URL-list rows")
    ax.set_title(
        f"Download: {summary['input_rows']} rows in {summary['parts']} parts, "
        f"{100 * summary['success_rate']:.1f}% success"
    )
    _save(fig, path)


def plot_kmeans(stats: dict, path: str) -> None:
    objective = [it["objective"] for it in stats["iterations"]]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, len(objective) + 1), objective, marker=".")
    ax.set_xlabel("iteration")
    ax.set_ylabel("sum of cosine to centroid")
    ax.set_title(f"k-means: k={stats['k']}, {stats['sample_size']} vectors, d={stats['d']}")
    _save(fig, path)


def plot_training(metrics_path: str, path: str) -> None:
    """Loss; images/s; and each window's seconds per step, waiting for the loader vs in the
    step: a loader-bound run shows the first, a compute-bound one the second."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    steps = [r["step"] for r in records]
    fig, (loss_ax, speed_ax, time_ax) = plt.subplots(1, 3, figsize=(13, 3))
    loss_ax.plot(steps, [r["loss"] for r in records], marker=".")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("partial ArcFace loss")
    speed_ax.plot(steps, [r["samples_per_s"] for r in records], marker=".", color="tab:green")
    speed_ax.set_xlabel("step")
    speed_ax.set_ylabel("images / s (all ranks)")
    timed = [r for r in records if "data_wait_s" in r]  # older runs did not measure it
    if timed:
        wait = [r["data_wait_s"] for r in timed]
        busy = [r["step_s"] for r in timed]
        x = [r["step"] for r in timed]
        time_ax.stackplot(x, wait, busy, labels=["waiting for data", "in the step"])
        time_ax.legend(fontsize=8, loc="upper right")
        share = sum(r["data_wait_share"] for r in timed) / len(timed)
        time_ax.set_title(f"mean data-wait share {share:.0%} (the slowest rank's)", fontsize=9)
    else:
        time_ax.text(
            0.5, 0.5, "not measured", ha="center", va="center", transform=time_ax.transAxes
        )
    time_ax.set_xlabel("step")
    time_ax.set_ylabel("seconds per step")
    fig.suptitle("Training")
    _save(fig, path)


PROTOCOLS = {  # protocol -> the score its panel shows
    formats.ZERO_SHOT: "recall@1",
    formats.FINE_TUNED: "recall@1",
    formats.LINEAR_PROBE: "top1",
}


def plot_protocols(summary_csv: str, path: str) -> None:
    """One panel per protocol: its score (full size) per dataset, a bar per model."""
    rows = list(csv.DictReader(Path(summary_csv).read_text().splitlines()))
    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(4.5 * len(PROTOCOLS), 3.4), squeeze=False)
    for ax, (protocol, metric) in zip(axes[0], PROTOCOLS.items(), strict=True):
        subset = [r for r in rows if r["protocol"] == protocol]
        full = {}  # the largest size of each model x dataset
        for r in subset:
            key = (r["model"], r["dataset"])
            if key not in full or int(r["dim"]) > int(full[key]["dim"]):
                full[key] = r
        datasets = sorted({d for _, d in full})
        models = sorted({m for m, _ in full})
        width = 0.8 / max(len(models), 1)
        for m, model in enumerate(models):
            values = [
                float(full[(model, d)][metric] or "nan") if (model, d) in full else float("nan")
                for d in datasets
            ]
            ax.bar([i + m * width for i in range(len(datasets))], values, width, label=model)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(datasets))], datasets)
        ax.set_title(f"{protocol}: {metric}")
        ax.set_ylim(0, 1)
        if models:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


def plot_retrieval(summary_csv: str, path: str) -> None:
    """Bars of R@1 and MAP@R per model at each embedding size, one panel per dataset
    (zero-shot retrieval)."""
    rows = list(csv.DictReader(Path(summary_csv).read_text().splitlines()))
    rows = [r for r in rows if r.get("protocol", formats.ZERO_SHOT) == formats.ZERO_SHOT]
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 2.8 * len(datasets)), squeeze=False)
    for row_axes, dataset in zip(axes, datasets, strict=True):
        subset = [r for r in rows if r["dataset"] == dataset]
        models = sorted({r["model"] for r in subset})
        dims = sorted({int(r["dim"]) for r in subset}, reverse=True)
        for ax, metric in zip(row_axes, ("recall@1", "map@r"), strict=True):
            width = 0.8 / len(models)
            for m, model in enumerate(models):
                by_dim = {
                    int(r["dim"]): float(r[metric] or "nan") for r in subset if r["model"] == model
                }
                xs = [d + m * width for d in range(len(dims))]
                ax.bar(xs, [by_dim.get(d, float("nan")) for d in dims], width, label=model)
            ax.set_xticks([d + 0.4 - width / 2 for d in range(len(dims))], [str(d) for d in dims])
            ax.set_xlabel("embedding dimensions")
            ax.set_title(f"{dataset}: {metric}")
            ax.legend(fontsize=8)
    _save(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.report.plots", description=__doc__)
    parser.add_argument("--download-summary")
    parser.add_argument("--kmeans-stats")
    parser.add_argument("--train-metrics")
    parser.add_argument("--eval-summary")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out_dir)
    if args.download_summary:
        plot_download(
            json.loads(Path(args.download_summary).read_text()), str(out / "download.png")
        )
    if args.kmeans_stats:
        plot_kmeans(json.loads(Path(args.kmeans_stats).read_text()), str(out / "kmeans.png"))
    if args.train_metrics:
        plot_training(args.train_metrics, str(out / "training.png"))
    if args.eval_summary:
        plot_retrieval(args.eval_summary, str(out / "retrieval.png"))
        plot_protocols(args.eval_summary, str(out / "protocols.png"))


if __name__ == "__main__":
    run_cli(main)
