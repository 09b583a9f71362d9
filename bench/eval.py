"""Time exact retrieval evaluation: queries x gallery of random unit vectors.

Measures, on the same data:

- search: faiss exact top-K search alone (``unicom.evaluate.metrics.ExactSearch``, K = max of --ks);
- metrics: ``unicom.evaluate.metrics.retrieval_metrics`` end to end (query -> gallery protocol:
  normalisation, chunked search of max(K, R) neighbours, tie handling, Recall@K, MAP@R,
  R-Precision), with labels giving about --per-class gallery items per class (R).

and prints seconds and queries/s for each (best of --repeat runs).

    python bench/eval.py                                   # 10k queries x 100k gallery, dim 512
    python bench/eval.py --queries 2000 --gallery 20000 --dim 256 --per-class 50 --json out.json
"""

from __future__ import annotations

import argparse
import logging
import time

import faiss
import numpy as np

from unicom.cli import run_cli, setup_logging
from unicom.evaluate.metrics import DEFAULT_KS, ExactSearch, retrieval_metrics
from unicom.io import write_json
from unicom.vectors import l2_normalize

log = logging.getLogger("unicom.bench.eval")


def random_unit_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    return l2_normalize(rng.standard_normal((count, dim), dtype=np.float32))


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python bench/eval.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=10, help="gallery items per class (R)")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--chunk-size", type=int, default=None, help="default: automatic")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the timings here")
    args = parser.parse_args(argv)
    setup_logging()

    rng = np.random.default_rng(args.seed)
    gallery = random_unit_vectors(rng, args.gallery, args.dim)
    queries = random_unit_vectors(rng, args.queries, args.dim)
    classes = max(1, args.gallery // args.per_class)
    gallery_labels = rng.integers(0, classes, size=args.gallery)
    query_labels = rng.integers(0, classes, size=args.queries)
    threads = faiss.omp_get_max_threads()
    log.info(
        "%d queries x %d gallery, dim %d, %d classes, faiss %s, %d threads, %d GPUs",
        args.queries,
        args.gallery,
        args.dim,
        classes,
        faiss.__version__,
        threads,
        faiss.get_num_gpus(),
    )

    search = ExactSearch(gallery)
    k = max(args.ks)
    search_s = best_time(lambda: search.search(queries, k), args.repeat)
    result: dict = {}

    def run_metrics() -> None:
        result.update(
            retrieval_metrics(
                queries, query_labels, gallery, gallery_labels, args.ks, args.chunk_size
            )
        )

    metrics_s = best_time(run_metrics, args.repeat)
    timings = {
        "queries": args.queries,
        "gallery": args.gallery,
        "dim": args.dim,
        "threads": threads,
        "gpus": faiss.get_num_gpus(),
        "search_k": k,
        "search_s": round(search_s, 3),
        "search_queries_per_s": round(args.queries / search_s, 1),
        "metrics_neighbours": result["neighbours"],
        "metrics_s": round(metrics_s, 3),
        "metrics_queries_per_s": round(args.queries / metrics_s, 1),
    }
    print(
        f"search  (k={k}): {search_s:8.2f} s  {args.queries / search_s:10.0f} queries/s\n"
        f"metrics (k={result['neighbours']}): {metrics_s:8.2f} s  "
        f"{args.queries / metrics_s:10.0f} queries/s"
    )
    if args.json:
        write_json(args.json, timings)


if __name__ == "__main__":
    run_cli(main)
