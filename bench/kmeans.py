"""faiss k-means throughput next to this machine's sgemm, and assignment speed.

One k-means iteration is dominated by one matrix product, (n x d) vectors times (d x k)
centroids = 2*n*d*k flops, plus the argmax and the centroid update. So the ceiling is the
machine's float32 GEMM rate: this prints faiss k-means GFLOP/s (its best and median iteration)
next to numpy's sgemm GFLOP/s on the same shapes and threads, their ratio (goal >= 0.8), the
BLAS builds in use, and the assign stage's time per million vectors. Other processes on the
machine lower both numbers; the load average is printed so that runs can be compared.

    python bench/kmeans.py                      # n=100k, d=512, k=2000, 5 iterations (~1 min)
    python bench/kmeans.py --n 200000           # the full size (n=200k)
    python bench/kmeans.py --n 50000 --k 500    # quicker
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import faiss
import numpy as np

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


if __name__ == "__main__":
    main()
