"""k-means throughput (faiss, and the torch backend on 1 and 2 gloo ranks) next to this
machine's sgemm, and assignment speed.

One k-means iteration is dominated by one matrix product, (n x d) vectors times (d x k)
centroids = 2*n*d*k flops, plus the argmax and the centroid update. So the ceiling is the
machine's float32 GEMM rate: this prints faiss k-means GFLOP/s (its best and median iteration)
next to numpy's sgemm GFLOP/s on the same shapes and threads, their ratio (goal >= 0.8), the
BLAS builds in use, and the assign stage's time per million vectors. Then the same data and the
same initial centroids through faiss, the torch backend on one process and on 2 gloo ranks
(each with half the threads): objective per iteration and GFLOP/s of each. Other processes on
the machine lower every number; the load average is printed so that runs can be compared.

    python bench/kmeans.py                      # n=100k, d=512, k=2000, 5 iterations (~1 min)
    python bench/kmeans.py --n 200000           # the full size (n=200k)
    python bench/kmeans.py --n 50000 --k 500    # quicker
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unicom.cluster.torch_kmeans import gather_rows, kmeans, random_init
from unicom.vectors import centroid_index, l2_normalize, resolve_gpu, search_centroids

GOAL = 0.8


def sgemm_gflops(x: np.ndarray, centroids: np.ndarray, repeats: int) -> float:
    """Best-of-``repeats`` GFLOP/s of x @ centroids.T in float32 (numpy's BLAS)."""
    out = np.empty((len(x), len(centroids)), np.float32)
    np.matmul(x[:1000], centroids.T)  # warm-up: thread pool, page faults
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(x, centroids.T, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * x.shape[0] * x.shape[1] * len(centroids) / best / 1e9


def blas_libraries() -> str:
    """Loaded OpenBLAS builds and the kernels they picked (faiss-cpu bundles its own)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (no threadpoolctl)"
    return ", ".join(
        f"{Path(lib['filepath']).name} {lib.get('version')} [{lib.get('architecture')}]"
        for lib in threadpool_info()
        if lib.get("internal_api") in ("openblas", "mkl", "blis")
    )


def numpy_sgemm(x: np.ndarray, centroids: np.ndarray, repeats: int, threads: int) -> float:
    """sgemm GFLOP/s with numpy's BLAS limited to the threads faiss gets."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy then uses every core, which flatters the ceiling
        return sgemm_gflops(x, centroids, repeats)
    with threadpool_limits(threads):
        return sgemm_gflops(x, centroids, repeats)


def kmeans_gflops(x: np.ndarray, k: int, niter: int, gpu: bool) -> tuple[float, float]:
    """(best, median) GFLOP/s over the iterations of one faiss spherical k-means.

    The best iteration estimates the speed on an idle machine, the median the typical one;
    each iteration counts its assignment (2*n*d*k flops) and its centroid update.
    """
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=1,
        spherical=True,
        gpu=gpu,
        max_points_per_centroid=-(-len(x) // k),
    )
    kmeans.train(x)
    seconds = np.diff([0.0] + [s["time"] for s in kmeans.iteration_stats])
    flops = 2 * x.shape[0] * x.shape[1] * k
    return flops / seconds.min() / 1e9, flops / np.median(seconds) / 1e9


def bench_data(n: int, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors and the rows that start as centroids (regenerated alike in every rank)."""
    x = l2_normalize(np.random.default_rng(0).standard_normal((n, d), dtype=np.float32))
    return x, random_init(n, k, seed=1)


def row_summary(name: str, objectives: list[float], seconds: list[float], flops: float) -> str:
    best = flops / min(seconds) / 1e9
    return (
        f"{name:<22}: objective {objectives[0]:.1f} -> {objectives[-1]:.1f} "
        f"({len(objectives)} it.), {best:8.1f} GFLOP/s best iteration"
    )


def faiss_same_init(x: np.ndarray, init: np.ndarray, niter: int) -> tuple[list, list]:
    km = faiss.Kmeans(x.shape[1], len(init), niter=niter, spherical=True, seed=1,
                      max_points_per_centroid=-(-len(x) // len(init)))  # fmt: skip
    km.train(x, init_centroids=init.copy())
    seconds = np.diff([0.0] + [s["time"] for s in km.iteration_stats]).tolist()
    return [float(s["obj"]) for s in km.iteration_stats], seconds


def _torch_rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=30))  # fmt: skip

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    x, rows = bench_data(args.n, args.d, args.k)
    bounds = np.linspace(0, args.n, world + 1).astype(int)
    local = torch.from_numpy(x[bounds[rank] : bounds[rank + 1]])
    init = gather_rows(local, int(bounds[rank]), rows, reduce)
    result = kmeans(local, init, args.niter, seed=1, reduce=reduce)
    if rank == 0:
        torch.save([[it["obj"], it["time"]] for it in result.iterations], f"{out}/iterations.pt")
    dist.destroy_process_group()


def torch_two_ranks(args: argparse.Namespace) -> tuple[list, list]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_torch_rank, args=(2, port, args, out), nprocs=2)
        iterations = torch.load(f"{out}/iterations.pt", weights_only=True)
    return [o for o, _ in iterations], [t for _, t in iterations]


def compare_backends(args: argparse.Namespace, sgemm: float) -> None:
    """faiss, torch on 1 process and torch on 2 gloo ranks from the same initial centroids."""
    x, rows = bench_data(args.n, args.d, args.k)
    flops = 2 * args.n * args.d * args.k
    print(f"same data and initialisation (k={args.k}); numpy sgemm {sgemm:.1f} GFLOP/s:")
    objectives, seconds = faiss_same_init(x, x[rows], args.niter)
    print(row_summary("faiss", objectives, seconds, flops))
    torch.set_num_threads(args.threads)
    result = kmeans(torch.from_numpy(x), torch.from_numpy(x[rows]), args.niter, seed=1)
    one = [it["obj"] for it in result.iterations], [it["time"] for it in result.iterations]
    print(row_summary("torch, 1 rank", *one, flops))
    print(row_summary("torch, 2 gloo ranks", *torch_two_ranks(args), flops))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="vectors (200000: full size)")
    parser.add_argument("--d", type=int, default=512, help="dimension")
    parser.add_argument("--k", type=int, default=2000, help="centroids")
    parser.add_argument("--niter", type=int, default=5, help="k-means iterations")
    parser.add_argument("--repeats", type=int, default=3, help="sgemm repeats (best is kept)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads")
    parser.add_argument("--gpu", default="auto", choices=["auto", "true", "false"])
    parser.add_argument(
        "--no-backends", action="store_true", help="skip the faiss / torch / 2-rank comparison"
    )
    args = parser.parse_args(argv)

    faiss.omp_set_num_threads(args.threads)
    gpu = resolve_gpu(args.gpu)
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.standard_normal((args.n, args.d), dtype=np.float32))
    centroids = x[rng.choice(args.n, args.k, replace=False)]

    # sgemm before and after the k-means run (best kept), so that a busy machine hurts
    # both sides of the ratio alike.
    sgemm = numpy_sgemm(x, centroids, args.repeats, args.threads)
    best, median = kmeans_gflops(x, args.k, args.niter, gpu)
    sgemm = max(sgemm, numpy_sgemm(x, centroids, args.repeats, args.threads))

    index = centroid_index(centroids, gpu)
    search_centroids(index, x[:1000], 2)
    start = time.perf_counter()
    search_centroids(index, x, 2)
    assign_seconds = time.perf_counter() - start

    device = f"{faiss.get_num_gpus()} GPU(s)" if gpu else f"CPU, {args.threads} threads"
    print(
        f"n={args.n} d={args.d} k={args.k} niter={args.niter}  faiss {faiss.__version__} on "
        f"{device}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"BLAS libraries: {blas_libraries()}")
    print(f"numpy sgemm (n x d)(d x k)      : {sgemm:8.1f} GFLOP/s (best of 2 x {args.repeats})")
    ratio = best / sgemm
    print(
        f"faiss k-means (spherical)     : {best:8.1f} GFLOP/s best iteration ({median:.1f} "
        f"median); ratio {ratio:.3f} (goal >= {GOAL}) {'OK' if ratio >= GOAL else 'BELOW GOAL'}"
    )
    print(
        f"assign (top-2, k={args.k}, d={args.d})  : {assign_seconds / args.n * 1e6:8.2f} s "
        "per million vectors"
    )
    if not args.no_backends:
        compare_backends(args, sgemm)


if __name__ == "__main__":
    main()
