"""Hygiene accounting for the report: every URL-list row as kept or under its drop reason
(``summary.json``, ``drops.png``), and a grid of the largest near-duplicate groups, the kept
image first (``near_duplicates.png``), to judge ``dedup.threshold`` by eye."""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from PIL import Image  # noqa: E402

from unicom import (
    drops,  # noqa: E402
    shards,  # noqa: E402
)
from unicom.cli import run_cli, setup_logging  # noqa: E402
from unicom.images import to_rgb  # noqa: E402
from unicom.io import write_json, write_png  # noqa: E402

log = logging.getLogger("unicom.hygiene.report")
PER_ROW = 6


def accounting(
    download: Mapping[str, Any], dropped: Mapping[str, int], checked: Sequence[str] = ()
) -> dict[str, int]:
    """Rows per outcome: ``kept`` (trained on) and each reason; they add up to the URL list.
    A reason in ``checked`` (a check the run made) is listed even when it found nothing."""
    counts = {reason: 0 for reason in checked if reason not in drops.REASONS}
    counts.update(download["counts"])
    dropped = {**{reason: 0 for reason in checked if reason in drops.REASONS}, **dropped}
    successes = counts.pop("success", 0)
    kept = successes - sum(dropped.values())
    if kept < 0:
        raise ValueError(f"{sum(dropped.values())} rows dropped of {successes} successes")
    left_out = download.get("left_out_beyond_max_rows", 0)
    result = {"kept": kept, **dict(sorted(dropped.items())), **counts}
    if left_out:
        result["beyond_data.max_rows"] = left_out
    return result


def near_groups(near: Any, largest: int) -> list[tuple[str, list[tuple[str, float]]]]:
    """The ``largest`` near-duplicate groups: (kept key, [(dropped key, similarity)...]),
    biggest first, ties by kept key."""
    groups: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for key, twin, sim in zip(
        near["key"].to_pylist(),
        near["twin"].to_pylist(),
        near["similarity"].to_pylist(),
        strict=True,
    ):
        groups[twin].append((key, sim))
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return [(kept, sorted(members, key=lambda m: -m[1])) for kept, members in ordered[:largest]]


def parts_of(near: Any) -> dict[str, str]:
    """Key -> part of every dropped and kept sample the near-duplicate drops name."""
    columns = ("key", "part", "twin", "twin_part")
    keys, parts, twins, twin_parts = (near[c].to_pylist() for c in columns)
    return {**dict(zip(twins, twin_parts, strict=True)), **dict(zip(keys, parts, strict=True))}


def load_images(
    keys: Sequence[str], part_of: Mapping[str, str], shard_pattern: str
) -> dict[str, Image.Image]:
    by_part: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        by_part[part_of[key]].append(key)
    images = {}
    for part, wanted in sorted(by_part.items()):
        for key, sample in shards.read_samples(shard_pattern.format(part=part), wanted).items():
            found = shards.sample_image(sample)
            if found is not None:
                images[key] = to_rgb(Image.open(io.BytesIO(found[1])))
    return images


def plot_accounting(counts: Mapping[str, int], path: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(counts) + 1.2))
    colours = ["tab:green" if name == "kept" else "tab:red" for name in counts]
    bars = ax.barh(list(counts)[::-1], list(counts.values())[::-1], color=colours[::-1])
    ax.bar_label(bars)
    ax.set_xlabel("URL-list rows")
    ax.set_title(f"Every row: kept for training vs each drop reason ({sum(counts.values())} rows)")
    fig.tight_layout()
    write_png(path, fig, 100)


def plot_groups(groups, images: Mapping[str, Image.Image], threshold: float, path: str) -> None:
    rows = max(len(groups), 1)
    fig, axes = plt.subplots(rows, PER_ROW, figsize=(1.6 * PER_ROW, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (kept, members) in enumerate(groups):
        cells = [(kept, None), *members[: PER_ROW - 1]]
        for col, (key, sim) in enumerate(cells):
            ax = axes[row][col]
            if key in images:
                ax.imshow(images[key])
            ax.set_title(
                "kept" if sim is None else f"cos {sim:.3f}",
                fontsize=8,
                color="tab:green" if sim is None else "tab:red",
            )
    if not groups:
        axes[0][0].set_title("no near-duplicates at this threshold", fontsize=9)
    fig.suptitle(f"Largest near-duplicate groups (threshold {threshold}); kept image first")
    fig.tight_layout()
    write_png(path, fig, 100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.hygiene.report", description=__doc__)
    parser.add_argument("--download", required=True, help="download/summary.json")
    parser.add_argument("--screen", default=None, help="hygiene/screen.json")
    parser.add_argument("--drops", nargs="*", default=[], help="every drops file")
    parser.add_argument("--near-stats", nargs="*", default=[], help="hygiene/near/*.json")
    parser.add_argument("--shards", default=None, help="shard pattern with {part} (grid images)")
    parser.add_argument(
        "--checked", nargs="*", default=[], help="the reasons the run checked for (0 is shown)"
    )
    parser.add_argument("--grid-groups", type=int, default=6)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--out", required=True, help="summary JSON")
    parser.add_argument("--out-png", required=True, help="accounting bar chart")
    parser.add_argument("--out-grid", default=None, help="near-duplicate grid (dedup.near)")
    args = parser.parse_args(argv)
    setup_logging()
    download = json.loads(Path(args.download).read_text())
    table = drops.read(args.drops)
    near_table = table.filter(pc.equal(table["reason"], drops.NEAR_DUPLICATE))
    dropped = drops.count_reasons(table)
    counts = accounting(download, dropped, args.checked)
    near = [json.loads(Path(p).read_text()) for p in args.near_stats]
    summary = {
        "rows": counts,
        "url_list_rows": download.get("url_list_rows", download["input_rows"]),
        "screen": json.loads(Path(args.screen).read_text()) if args.screen else None,
        "near_duplicates": {
            "groups": len(set(near_table["twin"].to_pylist())),
            "clusters": sum(s["clusters"] for s in near),
            "items": sum(s["items"] for s in near),
            "dropped": sum(s["dropped"] for s in near),
            "pairwise_flop": sum(s["pairwise_flop"] for s in near),
            "seconds": round(sum(s["seconds"] for s in near), 3),
        }
        if near
        else None,
    }
    if sum(counts.values()) != summary["url_list_rows"]:
        raise RuntimeError(f"hygiene accounting: {counts} do not add up to the URL list")
    plot_accounting(counts, args.out_png)
    if args.out_grid:
        groups = near_groups(near_table, args.grid_groups)
        keys = [k for kept, members in groups for k in [kept, *(m for m, _ in members)]]
        images = load_images(keys, parts_of(near_table), args.shards)
        plot_groups(groups, images, args.threshold, args.out_grid)
    write_json(args.out, summary)
    log.info("hygiene: %s", counts)


if __name__ == "__main__":
    run_cli(main)
