"""Spherical k-means on torch, spread over the ranks of ``torch.distributed``.

Each rank holds its own slice of the sample; an iteration is

1. assignment: the nearest centroid of every local vector, as chunked matrix products on the
   rank's device (memory: the centroids, k x d, plus one chunk x k score block);
2. update: per-rank sums (float64) and counts of the vectors of each cluster, all-reduced
   (NCCL on GPUs, gloo on CPU), then divided and L2-normalised;
3. empty clusters re-seeded as faiss does: split a large cluster's centroid in two by a
   small symmetric perturbation, the cluster chosen by a generator seeded from the config
   seed and the iteration, so every rank (and every rank count) makes the same choice.

Every rank ends with the same centroids; the objective (sum of cosines to the nearest
centroid, higher is better) is computed at each assignment step, as faiss reports it.
``reduce`` is the all-reduce (a no-op on one process), so the core runs and is tested without
a process group too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from unicom import distributed, formats
from unicom.devices import rank_device

# faiss's split perturbation (Clustering.cpp: EPS = 1 / 1024).
SPLIT_EPS = 1.0 / 1024
# Candidates re-scored in fp32 after a bf16 pass (the true best is among them unless more than
# this many centroids lie within bf16's rounding of it).
RECHECK_CANDIDATES = 8
PRECISIONS = ("fp32", "tf32", "bf16")

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_centroids(
    x: torch.Tensor,
    centroids: torch.Tensor,
    topk: int = 1,
    chunk: int = 4096,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, labels), each (n, topk), best first, by inner product, ``chunk`` rows at
    a time. ``bf16`` scores in bfloat16, then re-scores its best candidates in fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    sims = torch.empty(len(x), topk, dtype=torch.float32, device=x.device)
    labels = torch.empty(len(x), topk, dtype=torch.int64, device=x.device)
    low = centroids.to(torch.bfloat16) if precision == "bf16" else None
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        for start in range(0, len(x), chunk):
            block = x[start : start + chunk]
            if low is None:
                best = (block @ centroids.T).topk(topk, dim=1)
                sims[start : start + len(block)], labels[start : start + len(block)] = best
                continue
            wide = min(len(centroids), topk + RECHECK_CANDIDATES)
            candidates = (block.to(torch.bfloat16) @ low.T).topk(wide, dim=1).indices
            exact = torch.einsum("nd,nwd->nw", block, centroids[candidates])
            best = exact.topk(topk, dim=1)
            sims[start : start + len(block)] = best.values
            labels[start : start + len(block)] = candidates.gather(1, best.indices)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return sims, labels


def cluster_sums(
    x: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (float64, so that the rank count changes only the last bits) and counts."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, labels, x.to(torch.float64))
    counts = torch.bincount(labels, minlength=k).to(torch.int64)
    return sums, counts


def split_empty(
    centroids: torch.Tensor, counts: torch.Tensor, generator: np.random.Generator
) -> int:
    """Re-seed every empty cluster (in place) by splitting a cluster chosen with probability
    proportional to its size beyond one; returns how many were split."""
    counts = counts.clone()
    empty = torch.nonzero(counts == 0).flatten().tolist()
    dims = torch.arange(centroids.shape[1], device=centroids.device)
    up = torch.where(dims % 2 == 0, 1 + SPLIT_EPS, 1 - SPLIT_EPS).to(centroids.dtype)
    split = 0
    for target in empty:
        weights = (counts - 1).clamp_min(0).to(torch.float64).cpu().numpy()
        if weights.sum() == 0:
            break  # nothing left to split: fewer distinct points than clusters
        source = int(generator.choice(len(weights), p=weights / weights.sum()))
        centroids[target] = centroids[source] * up
        centroids[source] = centroids[source] * (2 - up)
        counts[target] = counts[source] // 2
        counts[source] -= counts[target]
        split += 1
    return split


@dataclass
class TorchKmeansResult:
    centroids: torch.Tensor
    iterations: list[dict[str, float]] = field(default_factory=list)


def kmeans(
    x: torch.Tensor,
    init_centroids: torch.Tensor,
    niter: int,
    seed: int,
    reduce: Reduce = no_reduce,
    chunk: int = 4096,
    precision: str = "fp32",
) -> TorchKmeansResult:
    """``niter`` iterations from ``init_centroids`` (k x d) over this rank's unit rows ``x``."""
    centroids = unit_rows(init_centroids.to(x.device, torch.float32))
    k = len(centroids)
    result = TorchKmeansResult(centroids)
    for iteration in range(niter):
        started = time.perf_counter()
        sims, labels = nearest_centroids(x, centroids, 1, chunk, precision)
        search_seconds = time.perf_counter() - started
        sums, counts = cluster_sums(x, labels[:, 0], k)
        objective = reduce(sims.sum(dtype=torch.float64).reshape(1))
        sums, counts = reduce(sums), reduce(counts)
        filled = counts > 0
        new = centroids.clone()
        new[filled] = (sums[filled] / counts[filled, None]).to(torch.float32)
        generator = np.random.default_rng([seed, iteration])
        nsplit = split_empty(new, counts, generator)
        centroids = unit_rows(new)
        result.iterations.append(
            {
                "obj": float(objective.item()),
                "time": time.perf_counter() - started,
                "time_search": search_seconds,
                "imbalance_factor": imbalance_factor(counts),
                "nsplit": nsplit,
            }
        )
    result.centroids = centroids
    return result


def imbalance_factor(counts: torch.Tensor) -> float:
    """faiss's measure: k * sum(n_i^2) / n^2 (1 for equal clusters)."""
    counts = counts.to(torch.float64)
    total = counts.sum()
    return float(len(counts) * (counts**2).sum() / (total**2)) if total > 0 else 0.0


def random_init(rows: int, k: int, seed: int) -> np.ndarray:
    """The global sample rows whose vectors start as centroids: ``k`` distinct, seeded, sorted."""
    return np.sort(np.random.default_rng(seed).choice(rows, size=k, replace=False))


def gather_rows(
    x: torch.Tensor, offset: int, rows: np.ndarray, reduce: Reduce = no_reduce
) -> torch.Tensor:
    """Global sample ``rows`` as a tensor on every rank: each rank fills the rows it holds
    (its slice starts at global row ``offset``), the all-reduce sums the parts."""
    out = torch.zeros(len(rows), x.shape[1], dtype=torch.float32, device=x.device)
    mine = (rows >= offset) & (rows < offset + len(x))
    if mine.any():
        local = torch.as_tensor(rows[mine] - offset, device=x.device)
        out[torch.as_tensor(np.flatnonzero(mine), device=x.device)] = x[local]
    return reduce(out)


# --------------------------------------------------------------------------- the stage, per rank


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks (in place); a no-op without a process group."""
    if distributed.is_distributed():
        dist.all_reduce(tensor)
    return tensor


def rank_files(planned: Sequence[int], world: int) -> list[tuple[int, int]]:
    """Contiguous file ranges [first, last) per rank with about equal planned rows (a rank gets
    none when there are fewer files than ranks)."""
    starts = np.cumsum([0, *planned])  # rows planned before each file
    cuts = [int(np.searchsorted(starts, starts[-1] * r / world)) for r in range(world)]
    bounds = [min(cut, len(planned)) for cut in cuts] + [len(planned)]
    return [(bounds[r], bounds[r + 1]) for r in range(world)]


def cluster_files(
    paths: Sequence[str],
    options: Mapping[str, Any],
    column: str = formats.EMBEDDING_COLUMN,
    threads: int | None = None,
    skip_files: Sequence[str] = (),
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The kmeans stage on this rank (call it on every rank): the same seeded sample as the
    faiss backend, each rank reading a contiguous slice of it. Rank 0 gets (centroids,
    statistics), the other ranks None."""
    info = distributed.world_info_from_env()
    device = rank_device(str(options["device"]), info.local_rank, "kmeans.device")
    if threads:
        torch.set_num_threads(max(1, threads // max(1, info.local_world_size)))
    distributed.init_distributed(info, device)
    try:
        return _cluster_on_rank(paths, options, column, info, device, skip_files)
    finally:
        distributed.shutdown()


def _cluster_on_rank(
    paths, options, column, info, device, skip_files=()
) -> tuple[np.ndarray, dict] | None:
    # Here, not at the top: the core above needs torch alone (bench/gpu_check.py imports it on
    # a machine without faiss).
    from unicom.cluster.sample import (
        check_enough_vectors,
        cluster_size_summary,
        planned_sample,
        read_sample,
    )
    from unicom.vectors import centroids_digest, inspect_files

    k, seed = options["k"], options["seed"]
    files = inspect_files(paths, column)
    plan, kept = planned_sample(files, k * options["max_points_per_centroid"], seed, skip_files)
    check_enough_vectors(files, k, kept)
    planned = [len(p) for p in plan]
    first, last = rank_files(planned, info.world_size)[info.rank]
    offset = int(sum(planned[:first]))
    started = time.monotonic()
    local = read_sample(files[first:last], plan[first:last], column) if last > first else None
    x = torch.from_numpy(local if local is not None else np.zeros((0, files[0].dim), np.float32))
    x = x.to(device)
    read_seconds = time.monotonic() - started
    total = int(sum(planned))
    init = gather_rows(x, offset, random_init(total, k, seed), all_reduce)
    started = time.monotonic()
    result = kmeans(
        x, init, options["niter"], seed, all_reduce, options["chunk"], options["precision"]
    )
    train_seconds = time.monotonic() - started
    sims, labels = nearest_centroids(x, result.centroids, 1, options["chunk"], options["precision"])
    objective = all_reduce(sims.sum(dtype=torch.float64).reshape(1))
    sizes = all_reduce(torch.bincount(labels[:, 0], minlength=k))
    if info.rank != 0:
        return None
    centroids = result.centroids.cpu().numpy().astype(np.float32)
    stats = {
        "k": k, "d": files[0].dim, "column": column, "files": len(files),
        "vectors": sum(f.rows for f in files), "sample_size": total,
        "sample_cap": k * options["max_points_per_centroid"], "options": dict(options),
        "backend": "torch", "torch_version": torch.__version__, "device": str(device),
        "ranks": info.world_size, "read_seconds": round(read_seconds, 3),
        "train_seconds": round(train_seconds, 3), "centroids_sha256": centroids_digest(centroids),
        "objective_meaning": "sum over the sample of the cosine to the nearest centroid (higher is better)",
        "iterations": [
            {"objective": it["obj"], "seconds": round(it["time"], 3),
             "search_seconds": round(it["time_search"], 3),
             "imbalance_factor": round(it["imbalance_factor"], 4), "split_clusters": it["nsplit"]}
            for it in result.iterations
        ],
        "final_objective": float(objective.item()),
        "mean_cosine_to_centroid": float(objective.item()) / total,
        "sample_cluster_sizes": cluster_size_summary(sizes.cpu().numpy()),
    }  # fmt: skip
    return centroids, stats
