"""Cluster sizes over all shards' assignments: ``clusters/sizes.json`` and ``sizes.png``.

Streams the assignment files (labels and similarities only), so it runs at LAION scale.
Reports min/median/max size, empty clusters, clusters below ``assign.min_cluster_size``
(candidates to drop before training) and how close samples are to their centroid.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from unicom import formats
from unicom.cli import add_each_part_option, expand_parts, run_cli, setup_logging
from unicom.errors import UnicomError
from unicom.io import write_json, write_png

log = logging.getLogger("unicom.cluster.report")

# Similarities (cosines) and margins are histogrammed on fixed bins, so quantiles come out
# to 0.001 without holding every value.
SIM_BINS = np.linspace(-1.0, 1.0, 2001)
MARGIN_BINS = np.linspace(0.0, 2.0, 2001)


@dataclass
class AssignmentStats:
    k: int
    sizes: np.ndarray  # (k,) samples per cluster
    sim_hist: np.ndarray
    margin_hist: np.ndarray
    sim_sum: float
    margin_sum: float

    @property
    def samples(self) -> int:
        return int(self.sizes.sum())


def assignment_identity(path: str) -> dict[str, Any]:
    identity = formats.read_metadata(path, formats.ASSIGN_METADATA_KEY)
    if identity is None:
        raise UnicomError(
            f"{path}: no '{formats.ASSIGN_METADATA_KEY.decode()}' metadata (not an assign output)"
        )
    return identity


def check_same_centroids(paths: Sequence[str]) -> dict[str, Any]:
    """The identity shared by every assignment file; a file from other centroids is an error."""
    first = assignment_identity(paths[0])
    for path in paths[1:]:
        identity = assignment_identity(path)
        if identity["centroids_sha256"] != first["centroids_sha256"]:
            raise UnicomError(
                f"{path}: assigned with other centroids than {paths[0]} (rerun assign)"
            )
    return first


def accumulate(
    stats: AssignmentStats, labels: np.ndarray, sim: np.ndarray, sim2: np.ndarray
) -> None:
    """Add one shard's assignments to the running statistics."""
    stats.sizes += np.bincount(labels, minlength=stats.k)
    margin = sim - sim2
    stats.sim_hist += np.histogram(np.clip(sim, -1, 1), SIM_BINS)[0]
    stats.margin_hist += np.histogram(np.clip(margin, 0, 2), MARGIN_BINS)[0]
    stats.sim_sum += float(sim.sum(dtype=np.float64))
    stats.margin_sum += float(margin.sum(dtype=np.float64))


def read_stats(paths: Sequence[str]) -> AssignmentStats:
    if not paths:
        raise UnicomError("no assignment files given")
    k = check_same_centroids(paths)["k"]
    stats = AssignmentStats(
        k,
        np.zeros(k, np.int64),
        np.zeros(len(SIM_BINS) - 1, np.int64),
        np.zeros(len(MARGIN_BINS) - 1, np.int64),
        0.0,
        0.0,
    )
    for path in tqdm(paths, desc="assignments", unit="file", mininterval=5):
        table = pq.read_table(path, columns=["label", "sim", "sim2"])
        labels = table["label"].to_numpy()
        if len(labels) and (labels.min() < 0 or labels.max() >= k):
            raise UnicomError(f"{path}: labels outside 0..{k - 1}")
        accumulate(stats, labels, table["sim"].to_numpy(), table["sim2"].to_numpy())
    return stats


def histogram_quantile(hist: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Upper edge of the bin holding quantile ``q`` of a histogram."""
    cumulative = np.cumsum(hist)
    index = int(np.searchsorted(cumulative, q * cumulative[-1]))
    return round(float(edges[min(index + 1, len(edges) - 1)]), 4)


def size_summary(stats: AssignmentStats, min_cluster_size: int) -> dict[str, Any]:
    sizes, n = stats.sizes, stats.samples
    small = sizes < min_cluster_size
    return {
        "k": stats.k,
        "samples": n,
        "size": {
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "mean": round(float(sizes.mean()), 3),
            "max": int(sizes.max()),
        },
        "empty_clusters": int((sizes == 0).sum()),
        "min_cluster_size": min_cluster_size,
        "clusters_below_min_size": int(small.sum()),
        "samples_in_clusters_below_min_size": int(sizes[small].sum()),
        "sim": {
            "mean": round(stats.sim_sum / max(n, 1), 4),
            **{f"p{q}": histogram_quantile(stats.sim_hist, SIM_BINS, q / 100) for q in (5, 50, 95)},
        },
        "margin": {
            "mean": round(stats.margin_sum / max(n, 1), 4),
            **{
                f"p{q}": histogram_quantile(stats.margin_hist, MARGIN_BINS, q / 100)
                for q in (5, 50, 95)
            },
        },
    }


def plot_sizes(stats: AssignmentStats, min_cluster_size: int, path: str | Path) -> None:
    """Sorted sizes, size histogram and similarity histograms in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.sort(stats.sizes)[::-1]
    fig, (ax_sorted, ax_hist, ax_sim) = plt.subplots(1, 3, figsize=(15, 4))
    ax_sorted.plot(np.arange(1, len(sizes) + 1), np.maximum(sizes, 0.5), drawstyle="steps-mid")
    ax_sorted.axhline(
        min_cluster_size,
        color="tab:red",
        ls="--",
        lw=1,
        label=f"assign.min_cluster_size = {min_cluster_size}",
    )
    ax_sorted.set(
        yscale="log",
        xlabel="cluster rank",
        ylabel="samples (log)",
        title=f"cluster sizes, sorted (k={stats.k}, n={stats.samples})",
    )
    ax_sorted.legend(fontsize=8)
    ax_hist.hist(stats.sizes, bins=min(50, max(10, stats.k // 4)), color="tab:blue")
    ax_hist.axvline(min_cluster_size, color="tab:red", ls="--", lw=1)
    ax_hist.set(xlabel="samples per cluster", ylabel="clusters", title="size histogram")
    centers = (SIM_BINS[:-1] + SIM_BINS[1:]) / 2
    coarse = 20  # 0.02-wide bins for display
    ax_sim.plot(
        centers.reshape(-1, coarse).mean(1),
        stats.sim_hist.reshape(-1, coarse).sum(1),
        label="sim (nearest centroid)",
    )
    margin_centers = (MARGIN_BINS[:-1] + MARGIN_BINS[1:]) / 2
    ax_sim.plot(
        margin_centers.reshape(-1, coarse).mean(1),
        stats.margin_hist.reshape(-1, coarse).sum(1),
        label="margin sim - sim2",
    )
    ax_sim.set(xlabel="cosine", ylabel="samples", title="similarity to centroids", xlim=(-0.1, 1))
    ax_sim.legend(fontsize=8)
    fig.tight_layout()
    write_png(path, fig, 90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.cluster.report", description=__doc__)
    parser.add_argument("assignments", nargs="+", help="assign/{part}.parquet of every shard")
    parser.add_argument(
        "--min-cluster-size",
        type=int,
        default=1,
        help="clusters smaller than this are counted (assign.min_cluster_size)",
    )
    parser.add_argument("--out-json", required=True, help="sizes.json to write")
    parser.add_argument("--out-png", required=True, help="sizes.png to write")
    add_each_part_option(parser)
    args = parser.parse_args(argv)
    setup_logging()
    stats = read_stats(expand_parts(args.assignments, args.each_part))
    summary = size_summary(stats, args.min_cluster_size)
    plot_sizes(stats, args.min_cluster_size, args.out_png)
    write_json(args.out_json, summary)
    log.info(
        "k=%d, %d samples: sizes %d..%d (median %g), %d empty, %d below %d",
        summary["k"],
        summary["samples"],
        summary["size"]["min"],
        summary["size"]["max"],
        summary["size"]["median"],
        summary["empty_clusters"],
        summary["clusters_below_min_size"],
        args.min_cluster_size,
    )


if __name__ == "__main__":
    run_cli(main)
