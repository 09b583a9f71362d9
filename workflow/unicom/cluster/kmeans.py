"""Spherical k-means over the fused embeddings of all shards: the pseudo-classes. faiss by
default; ``kmeans.backend: torch`` runs ``unicom.cluster.torch_kmeans`` on every rank instead.

Training reads a seeded sample of at most ``k * max_points_per_centroid`` vectors, streamed
from the shard Parquet files row group by row group, so the full corpus is never in memory.
The same code runs on faiss-cpu and faiss-gpu (all visible GPUs). ``two_level`` clusters
into ``coarse_k`` groups first and then each group into its share of the ``k`` centroids,
for k beyond what one flat k-means can train in reasonable time.

Outputs: ``centroids.npy`` (k x d float32, L2-normalised) and ``kmeans.json`` (objective per
iteration, timings, sample size, cluster sizes on the sample, faiss version, GPU use).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from unicom import formats
from unicom.cli import (
    add_each_part_option,
    expand_parts,
    run_cli,
    setup_logging,
)
from unicom.cluster import torch_kmeans
from unicom.cluster.sample import (
    check_enough_vectors,
    cluster_size_summary,
    planned_sample,
    read_sample,
)
from unicom.config import section_options
from unicom.errors import UnicomError
from unicom.io import write_json
from unicom.options import StageOptions
from unicom.planning import check_kmeans_backend
from unicom.vectors import (
    centroid_index,
    centroids_digest,
    inspect_files,
    l2_normalize,
    resolve_gpu,
    save_centroids,
    search_centroids,
    tune_faiss,
)

log = logging.getLogger("unicom.cluster.kmeans")
OPTIONS = StageOptions("kmeans")

INIT_METHODS = {
    "kmeans++": "ClusteringInitMethod_KMEANS_PLUS_PLUS",
    "afkmc2": "ClusteringInitMethod_AFK_MC2",
}


# ---------------------------------------------------------------------------------------------
# Inputs: shape checks and the seeded sample


# ---------------------------------------------------------------------------------------------
# faiss: device choice, search, training


def init_arguments(init: str) -> dict[str, Any]:
    """faiss.Kmeans keyword for the centroid initialisation (none for faiss's random default)."""
    if init == "random":
        return {}
    name = INIT_METHODS[init]
    if not hasattr(faiss, name):
        raise UnicomError(
            f"config key kmeans.init: '{init}' needs a newer faiss than {faiss.__version__}; "
            "use random"
        )
    return {"init_method": getattr(faiss, name)}


@dataclass(frozen=True)
class KmeansSettings:
    """The faiss settings shared by every k-means run of one clustering."""

    niter: int
    seed: int
    max_points_per_centroid: int
    gpu: bool
    init: str = "random"


def flat_kmeans(
    x: np.ndarray, k: int, settings: KmeansSettings, seed: int | None = None
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """One faiss spherical k-means; returns (centroids, faiss's per-iteration stats)."""
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=settings.niter,
        seed=settings.seed if seed is None else seed,
        spherical=True,
        max_points_per_centroid=settings.max_points_per_centroid,
        verbose=True,
        gpu=settings.gpu,
        **init_arguments(settings.init),
    )
    kmeans.train(np.ascontiguousarray(x, dtype=np.float32))
    return l2_normalize(kmeans.centroids), kmeans.iteration_stats


def allocate_subclusters(sizes: np.ndarray, k: int) -> np.ndarray:
    """Split ``k`` centroids among coarse clusters in proportion to their sizes.

    Each non-empty cluster gets at least one and never more centroids than points; the
    allocation sums to ``k`` (which must not exceed the number of points).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if k > sizes.sum():
        raise ValueError(f"cannot place {k} centroids on {sizes.sum()} points")
    quota = sizes * (k / sizes.sum())
    alloc = np.minimum(sizes, np.maximum(np.floor(quota), (sizes > 0).astype(float))).astype(
        np.int64
    )
    while (missing := k - int(alloc.sum())) != 0:
        if missing > 0:  # largest remainders first, among clusters with room
            room = alloc < sizes
            order = np.argsort(-np.where(room, quota - alloc, -np.inf), kind="stable")
            take = order[: min(missing, int(room.sum()))]
            alloc[take] += 1
        else:  # over-allocated by the minimum of one: take back from the most over quota
            spare = alloc > 1
            order = np.argsort(-np.where(spare, alloc - quota, -np.inf), kind="stable")
            take = order[: min(-missing, int(spare.sum()))]
            alloc[take] -= 1
    return alloc


def two_level_kmeans(
    x: np.ndarray, k: int, coarse_k: int, settings: KmeansSettings
) -> tuple[np.ndarray, list[dict[str, float]], dict[str, Any]]:
    """Coarse k-means into ``coarse_k`` groups, then each group into its share of ``k``."""
    coarse_k = min(coarse_k, k)
    log.info("two-level k-means: %d coarse clusters, then %d fine centroids", coarse_k, k)
    coarse, coarse_stats = flat_kmeans(x, coarse_k, settings)
    _, coarse_labels = search_centroids(centroid_index(coarse, settings.gpu), x)
    coarse_labels = coarse_labels[:, 0]
    sizes = np.bincount(coarse_labels, minlength=coarse_k)
    alloc = allocate_subclusters(sizes, k)
    order = np.argsort(coarse_labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    centroids = []
    for group in tqdm(range(coarse_k), desc="fine clusters", unit="group", mininterval=10):
        if alloc[group] == 0:
            continue
        members = x[order[bounds[group] : bounds[group + 1]]]
        if alloc[group] == len(members):  # as many centroids as points: the points themselves
            centroids.append(members)
            continue
        # Each group its own seed, so that groups do not share an initialisation pattern.
        fine, _ = flat_kmeans(members, int(alloc[group]), settings, settings.seed + 1 + group)
        centroids.append(fine)
    summary = {
        "coarse_k": coarse_k,
        "coarse_sizes": {"min": int(sizes.min()), "max": int(sizes.max())},
        "fine_per_coarse": {"min": int(alloc.min()), "max": int(alloc.max())},
    }
    return np.concatenate(centroids), coarse_stats, summary


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 to fd 2 while faiss prints (its verbose output is C printf on stdout).

    Rules redirect stderr to the job's log, so faiss's per-iteration lines land there too.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def train(x: np.ndarray, options: Mapping[str, Any], gpu: bool) -> tuple[np.ndarray, dict]:
    """Cluster the sample ``x`` (unit rows); return (centroids, statistics)."""
    k = options["k"]
    settings = KmeansSettings(
        options["niter"], options["seed"], options["max_points_per_centroid"], gpu, options["init"]
    )
    started = time.monotonic()
    stats: dict[str, Any] = {}
    with stdout_to_stderr():
        if options["two_level"]:
            coarse_k = options["coarse_k"] or max(1, round(math.sqrt(k)))
            centroids, iterations, stats["two_level"] = two_level_kmeans(x, k, coarse_k, settings)
            stats["objective_note"] = "per-iteration objective of the coarse level"
        else:
            centroids, iterations = flat_kmeans(x, k, settings)
    stats["train_seconds"] = round(time.monotonic() - started, 3)
    stats["objective_meaning"] = (
        "sum over the sample of the cosine to the nearest centroid (higher is better)"
    )
    stats["iterations"] = [
        {
            "objective": float(it["obj"]),
            "seconds": round(float(it["time"]), 3),
            "search_seconds": round(float(it["time_search"]), 3),
            "imbalance_factor": round(float(it["imbalance_factor"]), 4),
            "split_clusters": int(it["nsplit"]),
        }
        for it in iterations
    ]
    sims, labels = search_centroids(centroid_index(centroids, gpu), x)
    sizes = np.bincount(labels[:, 0], minlength=k)
    stats["final_objective"] = float(sims.sum())
    stats["mean_cosine_to_centroid"] = float(sims.mean())
    stats["sample_cluster_sizes"] = cluster_size_summary(sizes)
    return centroids.astype(np.float32), stats


# ---------------------------------------------------------------------------------------------
# Driver


def kmeans_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The kmeans section with the schema's defaults, checked (k >= 2 among them)."""
    options = section_options("kmeans", options)
    check_kmeans_backend(options)  # the same check the Snakefile makes before any job
    return options


def cluster_files(
    paths: Sequence[str],
    options: Mapping[str, Any],
    column: str = formats.EMBEDDING_COLUMN,
    threads: int | None = None,
    skip_files: Sequence[str] = (),
) -> tuple[np.ndarray, dict[str, Any]]:
    """Sample ``column`` from ``paths`` (less the rows in ``skip_files``, the screen's drops)
    and cluster it; return (centroids, statistics)."""
    options = kmeans_options(options)
    tune_faiss(threads)
    gpu = resolve_gpu(options["gpu"])
    files = inspect_files(paths, column)
    max_points = options["k"] * options["max_points_per_centroid"]
    plan, total = planned_sample(files, max_points, options["seed"], skip_files)
    check_enough_vectors(files, options["k"], total)
    started = time.monotonic()
    sample = read_sample(files, plan, column)
    read_seconds = time.monotonic() - started
    log.info(
        "clustering %d of %d vectors (d=%d) into k=%d on %s",
        len(sample),
        total,
        files[0].dim,
        options["k"],
        "GPU" if gpu else "CPU",
    )
    centroids, stats = train(sample, options, gpu)
    stats = {
        "k": options["k"],
        "d": files[0].dim,
        "column": column,
        "files": len(files),
        "vectors": total,
        "skipped_by_screen": sum(f.rows for f in files) - total,
        "sample_size": len(sample),
        "sample_cap": max_points,
        "options": options,
        "faiss_version": faiss.__version__,
        "gpu": gpu,
        "gpus": faiss.get_num_gpus() if gpu else 0,
        "read_seconds": round(read_seconds, 3),
        "centroids_sha256": centroids_digest(centroids),
        **stats,
    }
    return centroids, stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unicom.cluster.kmeans",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("fused", nargs="+", help="fused Parquet files (column 'emb') of all shards")
    parser.add_argument("--out-centroids", required=True, help="centroids .npy to write")
    parser.add_argument("--out-stats", required=True, help="kmeans.json to write")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for faiss")
    parser.add_argument(
        "--skip", nargs="*", default=[], help="drops files (the screen's): rows left out"
    )
    add_each_part_option(parser)
    OPTIONS.add_to(parser)
    args = parser.parse_args(argv)
    options = kmeans_options(OPTIONS.from_args(args))
    setup_logging()
    fused = expand_parts(args.fused, args.each_part)
    if options["backend"] == "torch":
        result = torch_kmeans.cluster_files(
            fused, options, threads=args.threads, skip_files=args.skip
        )
        if result is None:
            return  # ranks other than 0 write nothing
        centroids, stats = result
    else:
        centroids, stats = cluster_files(fused, options, threads=args.threads, skip_files=args.skip)
    save_centroids(args.out_centroids, centroids)
    write_json(args.out_stats, stats)
    log.info(
        "k=%d centroids -> %s (train %.1f s, mean cosine %.3f, %d empty on the sample)",
        stats["k"],
        args.out_centroids,
        stats["train_seconds"],
        stats["mean_cosine_to_centroid"],
        stats["sample_cluster_sizes"]["empty"],
    )


if __name__ == "__main__":
    run_cli(main)
