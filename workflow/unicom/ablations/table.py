"""The ablation grid's table and plots: mean +- std over seeds per variant, benchmark and size.

Reads what ``rules/ablations.smk`` lists: per variant and seed, the training folder (its
metrics.jsonl) and one evaluate JSON per benchmark; and the frozen encoder's evaluations. Writes
``table.csv`` / ``table.md`` (Recall@1 and MAP@R at the full size and at the compact one, and
each metric's difference to the baseline over its Welch standard error) and ``plots.png``
(one panel per axis: its values on x, Recall@1 with the seeds' standard deviation as error bars).

A variant that samples negative classes (``train.sample_rate`` < 1) must have drawn some in its
run: if every step kept only its positives, the variant measured nothing about r1 and the table
stage fails with one line saying so.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unicom.cli import parse_options_json, run_cli, setup_logging
from unicom.errors import UnicomError
from unicom.io import write_png, write_text

METRICS = ("recall@1", "map@r")
BASELINE = "baseline"


def head_sampling(metrics_path: str | Path) -> dict[str, float]:
    """Mean prototypes and negatives per step of a training's metrics.jsonl."""
    lines = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    if not lines:
        raise UnicomError(f"{metrics_path}: no metrics lines")
    return {
        "prototypes": float(np.mean([line["head_prototypes"] for line in lines])),
        "negatives": float(np.mean([line["head_negatives"] for line in lines])),
    }


def check_sampling(run: Mapping[str, Any], sampling: Mapping[str, float]) -> None:
    """A variant with r1 < 1 must have sampled negatives, and not every class."""
    if run["sample_rate"] >= 1.0:
        return
    if sampling["negatives"] <= 0 or sampling["prototypes"] >= run["k"]:
        raise UnicomError(
            f"ablation variant {run['variant']} (seed {run['seed']}): train.sample_rate "
            f"{run['sample_rate']} drew {sampling['negatives']:.1f} negatives and "
            f"{sampling['prototypes']:.1f} of {run['k']} prototypes per step: no sampling "
            "happened (round(sample_rate x k) must exceed the distinct labels of a batch)"
        )


def scores(evaluation: Mapping[str, Any], compact_dim: int) -> dict[str, dict[str, float]]:
    """{"full": {metric: value}, "<compact_dim>": {...}} of one evaluate JSON."""
    results = evaluation["results"]
    picked = {}
    for dim in ("full", str(compact_dim)):
        if dim not in results:
            raise UnicomError(f"{evaluation['model']}: no results at dims {dim}")
        picked[dim] = {metric: float(results[dim][metric]) for metric in METRICS}
    return picked


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def difference(row: Mapping[str, Any], base: Mapping[str, Any], metric: str) -> tuple[float, float]:
    """A variant's mean minus the baseline's, and that over the standard error of a difference
    of two means over independent seeds (Welch's)."""
    delta = row[f"{metric}_mean"] - base[f"{metric}_mean"]
    error = math.sqrt(
        row[f"{metric}_std"] ** 2 / row["seeds"] + base[f"{metric}_std"] ** 2 / base["seeds"]
    )
    return delta, delta / error if error > 0 else math.nan


def grid_rows(
    runs: Sequence[Mapping[str, Any]],
    evaluations: Mapping[str, Mapping[str, Any]],
    sampling: Mapping[str, Mapping[str, float]],
    compact_dim: int,
) -> list[dict[str, Any]]:
    """One row per variant, benchmark and size (variants in grid order)."""
    collected: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    info: dict[str, dict[str, Any]] = {}
    for run in runs:
        name = run["variant"]
        info.setdefault(name, {"run": run, "negatives": []})
        info[name]["negatives"].append(sampling[run["train_dir"]]["negatives"])
        for dataset, path in run["evaluations"].items():
            for dim, values in scores(evaluations[path], compact_dim).items():
                cell = collected.setdefault((name, dataset, dim), {m: [] for m in METRICS})
                for metric in METRICS:
                    cell[metric].append(values[metric])
    rows = []
    for (name, dataset, dim), cell in collected.items():
        run = info[name]["run"]
        row: dict[str, Any] = {
            "variant": name,
            "changes": " ".join(f"{k}={v}" for k, v in run["overrides"].items()) or "-",
            "dataset": dataset,
            "dim": dim,
            "seeds": len(cell[METRICS[0]]),
            "head_negatives": float(np.mean(info[name]["negatives"])),
        }
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(cell[metric])
        rows.append(row)
    baseline = {(r["dataset"], r["dim"]): r for r in rows if r["variant"] == BASELINE}
    for row in rows:
        base = baseline.get((row["dataset"], row["dim"]))
        for metric in METRICS:
            delta, ratio = difference(row, base, metric) if base else (math.nan, math.nan)
            row[f"delta_{metric}"], row[f"delta_over_se_{metric}"] = delta, ratio
    order = {name: i for i, name in enumerate(info)}  # the grid's order (dicts keep it)
    return sorted(rows, key=lambda r: (r["dataset"], r["dim"] != "full", order[r["variant"]]))


def base_rows(base: Sequence[Mapping[str, Any]], compact_dim: int) -> list[dict[str, Any]]:
    """The frozen encoder's scores (one seed: no spread)."""
    rows = []
    for evaluation in base:
        for dim, values in scores(evaluation, compact_dim).items():
            row = {"variant": "base", "changes": "frozen encoder", "dim": dim, "seeds": 1}
            row["dataset"] = evaluation["dataset"]["name"]
            for metric in METRICS:
                row[f"{metric}_mean"], row[f"{metric}_std"] = values[metric], 0.0
            rows.append(row)
    return rows


CSV_COLUMNS = (
    "variant", "changes", "dataset", "dim", "seeds", "recall@1_mean", "recall@1_std",
    "map@r_mean", "map@r_std", "delta_recall@1", "delta_over_se_recall@1",
    "delta_map@r", "delta_over_se_map@r", "head_negatives",
)  # fmt: skip


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def _delta_cell(delta: float | None, ratio: float | None) -> str:
    if delta is None or math.isnan(delta):
        return ""
    return f"{delta:+.4f} ({ratio:+.1f})" if not math.isnan(ratio) else f"{delta:+.4f}"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [",".join(CSV_COLUMNS)]
    lines += [",".join(_cell(row.get(c)).replace(",", ";") for c in CSV_COLUMNS) for row in rows]
    return "\n".join(lines) + "\n"


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    header = (
        "| variant | changes | dataset | dim | seeds | R@1 | MAP@R | ΔR@1 (Δ/SE) | ΔMAP@R (Δ/SE) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        is_baseline = row["variant"] == BASELINE  # (its own differences are 0 by definition)
        deltas = [
            "" if is_baseline else _delta_cell(row.get(f"delta_{m}"), row.get(f"delta_over_se_{m}"))
            for m in METRICS
        ]
        cells = [
            f"**{row['variant']}**" if is_baseline else row["variant"],
            row["changes"],
            row["dataset"],
            row["dim"],
            str(row["seeds"]),
            f"{row['recall@1_mean']:.4f} ± {row['recall@1_std']:.4f}",
            f"{row['map@r_mean']:.4f} ± {row['map@r_std']:.4f}",
            *deltas,
        ]
        lines.append("| " + " | ".join(cells) + " |\n")
    return header + "".join(lines)


def plot_axes(
    rows: Sequence[Mapping[str, Any]],
    runs: Sequence[Mapping[str, Any]],
    axes: Mapping[str, Any],
    path: str,
) -> None:
    """One panel per axis: the baseline's value and each variant's on x, R@1 (full size) on y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = max(len(axes), 1)
    fig, panes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    datasets = sorted({row["dataset"] for row in rows})
    variant_of = {}
    for run in runs:
        if run["axis"]:
            variant_of.setdefault(run["axis"], {})[run["variant"]] = run["overrides"][run["axis"]]
    for pane, (axis, baseline_value) in zip(panes[0], axes.items(), strict=False):
        points = [(BASELINE, baseline_value)] + list(variant_of.get(axis, {}).items())
        points.sort(key=lambda p: (isinstance(p[1], str), p[1] if not isinstance(p[1], str) else 0))
        labels = [str(value) for _, value in points]
        for dataset in datasets:
            found = {
                (r["variant"]): r
                for r in rows
                if r["dataset"] == dataset and r["dim"] == "full" and r["variant"] in dict(points)
            }
            means = [
                found[name]["recall@1_mean"] if name in found else np.nan for name, _ in points
            ]
            stds = [found[name]["recall@1_std"] if name in found else np.nan for name, _ in points]
            pane.errorbar(
                range(len(points)), means, yerr=stds, marker="o", capsize=4, label=dataset
            )
        pane.set_xticks(range(len(points)), labels)
        pane.set_xlabel(f"{axis} (baseline {baseline_value})")
        pane.set_ylabel("Recall@1 (mean ± std over seeds)")
        pane.grid(alpha=0.3)
    if not axes:
        panes[0][0].text(0.5, 0.5, "no axes in ablations.axes", ha="center", va="center")
    panes[0][0].legend(fontsize=8)
    fig.tight_layout()
    write_png(path, fig, 110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.ablations.table", description=__doc__)
    parser.add_argument("--runs-json", required=True, help="variants x seeds (rules/ablations.smk)")
    parser.add_argument("--axes-json", default="{}", help="axis key -> the baseline's value")
    parser.add_argument("--base", nargs="*", default=[], help="the frozen encoder's evaluations")
    parser.add_argument("--compact-dim", type=int, required=True)
    parser.add_argument("--out-csv", required=True)
    parser.add_argument("--out-md", required=True)
    parser.add_argument("--out-png", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    runs = json.loads(args.runs_json)
    axes = parse_options_json(args.axes_json)
    sampling = {}
    for run in runs:
        sampling[run["train_dir"]] = head_sampling(Path(run["train_dir"]) / "metrics.jsonl")
        check_sampling(run, sampling[run["train_dir"]])
    paths = {p for run in runs for p in run["evaluations"].values()}
    evaluations = {p: json.loads(Path(p).read_text()) for p in paths}
    rows = grid_rows(runs, evaluations, sampling, args.compact_dim)
    rows += base_rows([json.loads(Path(p).read_text()) for p in args.base], args.compact_dim)
    write_text(args.out_csv, to_csv(rows))
    write_text(args.out_md, to_markdown(rows))
    plot_axes(rows, runs, axes, args.out_png)


if __name__ == "__main__":
    run_cli(main)
