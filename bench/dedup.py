"""Deduplication throughput: SemDeDup within clusters against the machine's sgemm, and the
external URL dedup of split_urls extrapolated to LAION-400M.

Near-duplicates: ``n`` random unit vectors (d = 512) in ``clusters`` equal clusters are run
through ``unicom.hygiene.near.semdedup`` cluster by cluster, as a near_dedup job does. Its
brute-force cost is sum_c n_c^2 d multiply-adds (2 flops each): this prints the achieved
GFLOP/s next to numpy's sgemm GFLOP/s on one cluster's shape, and their ratio.

URLs: a Parquet URL list of ``url_rows`` synthetic URLs (``dup_fraction`` of them repeats of
earlier ones, a tenth of those with the host in capitals) goes through split_urls' two-pass
dedup (64-bit hashes bucketed on disk); it prints rows/s, the peak memory of the process, the
scratch disk it used, and what that gives at 400M rows.

    python bench/dedup.py                       # n=1M in 1,000 clusters, 2M URLs (~2 min)
    python bench/dedup.py --n 200000 --url-rows 500000   # quicker
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unicom import duplicates
from unicom.data.split_urls import find_duplicate_urls
from unicom.hygiene import near

LAION_ROWS = 400_000_000


def sgemm_gflops(n: int, d: int, repeats: int = 3) -> float:
    """Best-of GFLOP/s of an (n x d) @ (d x n) float32 product: one cluster's pairs."""
    x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    x @ x.T  # warm-up
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        x @ x.T
        best = min(best, time.perf_counter() - start)
    return 2 * n * n * d / best / 1e9


def bench_near(n: int, clusters: int, d: int, threshold: float) -> None:
    rng = np.random.default_rng(0)
    size = n // clusters
    sgemm = sgemm_gflops(size, d)
    seconds, dropped = 0.0, 0
    for c in range(clusters):
        x = rng.standard_normal((size, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        keys = [f"{c}_{i}" for i in range(size)]
        start = time.perf_counter()
        result = near.semdedup(x, keys, threshold)
        seconds += time.perf_counter() - start
        dropped += int(result[0].sum())
    flop = near.flops([size] * clusters, d)
    achieved = flop / seconds / 1e9
    print(f"near-duplicates: {clusters * size:,} vectors, d={d}, {clusters} clusters of {size}")
    print(
        f"  semdedup {seconds:.1f} s = {clusters * size / seconds:,.0f} vectors/s, "
        f"{achieved:.1f} GFLOP/s of the sum_c n_c^2 d count ({flop / 1e12:.2f} TFLOP); "
        f"numpy sgemm {sgemm:.1f} GFLOP/s on ({size} x {d}) @ ({d} x {size}): "
        f"ratio {achieved / sgemm:.2f}; dropped {dropped} (random vectors: none expected)"
    )
    per_vector = seconds / (clusters * size)
    print(
        f"  at LAION-400M in 1M clusters of ~400 (cost ~ n_c): "
        f"{LAION_ROWS * per_vector * 400 / size / 3600:.1f} core-hours at this rate, "
        f"spread over dedup.groups jobs"
    )


def synthetic_urls(rows: int, dup_fraction: float, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    urls = [f"https://img{i % 997}.example.org/p/{i}/photo_{i * 7919 % 100003}.jpg"
            for i in range(rows)]  # fmt: skip
    repeats = np.flatnonzero(rng.random(rows) < dup_fraction)
    for row in repeats[repeats > 0]:
        source = urls[int(rng.integers(0, row))]
        urls[row] = source.replace("example.org", "EXAMPLE.org") if row % 10 == 0 else source
    return urls


def bench_urls(rows: int, dup_fraction: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "urls.parquet"
        pq.write_table(pa.table({"url": synthetic_urls(rows, dup_fraction)}), path)
        work = Path(tmp) / "work"
        peak_scratch = 0
        started = time.perf_counter()
        found, stats = find_duplicate_urls([path], "url", rows, work)
        seconds = time.perf_counter() - started
        del found
        peak_scratch = 8 * rows  # pass 1 writes one uint64 per row before reading it back
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bits = duplicates.bucket_bits(LAION_ROWS)
    print(
        f"URL dedup: {rows:,} rows, {stats['duplicates']:,} duplicates "
        f"({stats['candidate_rows']:,} candidate rows, {stats['hash_collisions']} collisions)"
    )
    print(
        f"  {seconds:.1f} s = {rows / seconds:,.0f} rows/s; peak RSS of this process "
        f"{peak_rss:,.0f} MiB (including the synthetic list); scratch {peak_scratch / 2**20:.0f} MiB"
    )
    print(
        f"  at 400M rows: ~{LAION_ROWS / (rows / seconds) / 60:.0f} min on one core, "
        f"{2**bits} hash buckets of ~{LAION_ROWS / 2**bits / 1e6:.1f}M rows "
        f"({LAION_ROWS / 2**bits * 8 / 2**20:.0f} MiB each), scratch {LAION_ROWS * 8 / 2**30:.1f} GiB, "
        f"and 16 bytes per duplicate row + 8 per candidate hash in memory "
        f"(~{LAION_ROWS * dup_fraction * 24 / 2**30:.1f} GiB at {dup_fraction:.0%} repeats)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--url-rows", type=int, default=2_000_000)
    parser.add_argument("--dup-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    bench_near(args.n, args.clusters, args.d, args.threshold)
    bench_urls(args.url_rows, args.dup_fraction)


if __name__ == "__main__":
    main()
