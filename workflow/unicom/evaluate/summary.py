"""Gather the per model x dataset metrics into one table (CSV + Markdown), one row per protocol,
model, dataset and size: zero-shot retrieval (the evaluate stage), fine-tuned retrieval (the
evaluate stage on a fine-tuned model) and linear probe (top-1 of ``unicom.supervised.linear_probe``)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from unicom import formats
from unicom.cli import run_cli, setup_logging
from unicom.io import write_text

COLUMNS = (
    "protocol",
    "model",
    "dataset",
    "dim",
    "recall@1",
    "recall@2",
    "recall@4",
    "recall@8",
    "map@r",
    "r_precision",
    "queries",
    "top1",
)
METRICS = COLUMNS[4:-2]


def summary_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per protocol, model, dataset and embedding size ('full' first, then decreasing)."""
    rows = []
    for result in results:
        protocol = result.get("protocol", formats.ZERO_SHOT)
        if "top1" in result:  # a linear probe: one score, at the model's full size
            rows.append(
                {
                    "protocol": protocol,
                    "model": result["model"],
                    "dataset": result["dataset"]["name"],
                    "dim": int(result["embedding_dim"]),
                    **{c: None for c in METRICS},
                    "queries": result["test_items"],
                    "top1": result["top1"],
                }
            )
            continue
        for dim, scores in result["results"].items():
            label = f"{result['embedding_dim']}" if dim == "full" else dim
            rows.append(
                {
                    "protocol": protocol,
                    "model": result["model"],
                    "dataset": result["dataset"]["name"],
                    "dim": int(label),
                    **{c: scores.get(c) for c in (*METRICS, "queries")},
                    "top1": None,
                }
            )
    order = {formats.ZERO_SHOT: 0, formats.FINE_TUNED: 1, formats.LINEAR_PROBE: 2}
    return sorted(
        rows, key=lambda r: (order.get(r["protocol"], 3), r["dataset"], r["model"], -r["dim"])
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def to_csv(rows: list[dict[str, Any]]) -> str:
    lines = [",".join(COLUMNS)] + [",".join(_cell(r[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"


def to_markdown(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return header + "".join("| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |\n" for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.evaluate.summary", description=__doc__)
    parser.add_argument("metrics", nargs="+", help="metrics JSON files of unicom.evaluate")
    parser.add_argument("--out-csv", required=True)
    parser.add_argument("--out-md", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    rows = summary_rows([json.loads(Path(p).read_text()) for p in args.metrics])
    write_text(args.out_csv, to_csv(rows))
    write_text(args.out_md, to_markdown(rows))


if __name__ == "__main__":
    run_cli(main)
