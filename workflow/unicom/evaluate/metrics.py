"""Retrieval metrics: Recall@K, MAP@R and R-Precision.

Definitions follow "A Metric Learning Reality Check" (Musgrave et al., 2020), and the
treatment of edge cases follows pytorch-metric-learning's ``AccuracyCalculator``:

- ``R`` is the number of relevant items for a query: the other samples sharing its label
  (single set), or the gallery samples sharing its label (query -> gallery).
- ``recall@K``: 1 if any of the K nearest neighbours shares the query's label, else 0.
- ``r_precision``: (relevant items among the R nearest neighbours) / R.
- ``map@r``: (1/R) * sum over i <= R of precision@i * [neighbour i is relevant].
- Queries with ``R = 0`` are excluded from every metric (and counted).

Similarity is the cosine: embeddings are L2-normalised and searched exactly with a faiss
``IndexFlatIP`` (on GPU when faiss sees one), chunked over queries so that only
``chunk x neighbours`` results are held at a time. In the single-set protocol a query is
removed from its own neighbour list *by index*, so an exact duplicate of the query (which
may tie with it, or outrank it) counts as an ordinary neighbour. Ties in similarity are
broken by gallery index, lowest first.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from unicom.cli import run_cli, setup_logging
from unicom.errors import UnicomError
from unicom.formats import column_to_numpy
from unicom.io import write_json
from unicom.vectors import l2_normalize

log = logging.getLogger("unicom.evaluate.metrics")

DEFAULT_KS = (1, 2, 4, 8)
DEFAULT_DIMS: tuple[int | str, ...] = ("full", 256, 128, 64)
# Auto chunking keeps about this many (query, neighbour) results in memory per chunk
# (~30 bytes each across scores, indices and the per-metric temporaries).
RESULTS_PER_CHUNK = 1 << 23
MAX_CHUNK = 16384
# faiss GPU k-selection handles at most this many neighbours per query.
GPU_MAX_K = 2048


# --------------------------------------------------------------------------- inputs


def unit_rows(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """(n, d) -> float32 rows of unit length; zero rows stay zero (similarity 0 to all)."""
    array = np.asarray(embeddings, dtype=np.float32)
    if array.ndim != 2:
        raise UnicomError(f"{name}: expected a 2-D array (n, dim), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise UnicomError(f"{name}: contains NaN or infinite values")
    return np.ascontiguousarray(l2_normalize(array), dtype=np.float32)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise UnicomError(f"ks must be positive integers, got {list(ks)}")
    return tuple(sorted({int(k) for k in ks}))


def _check_labels(labels: Sequence | np.ndarray, count: int, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) != count:
        raise UnicomError(f"{name}: expected {count} labels (one per embedding), got {array.shape}")
    if array.dtype == object and any(label is None for label in array):
        raise UnicomError(f"{name}: contains missing (null) labels")
    return array


def encode_labels(*label_sets: np.ndarray) -> list[np.ndarray]:
    """Map labels of any type to shared integer codes (same label -> same code everywhere)."""
    joined = np.concatenate([np.asarray(labels) for labels in label_sets])
    _, codes = np.unique(joined, return_inverse=True)
    codes = codes.reshape(-1)
    bounds = np.cumsum([0] + [len(labels) for labels in label_sets])
    return [codes[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# --------------------------------------------------------------------------- search


class ExactSearch:
    """Exact inner-product search over a gallery with faiss (GPU when asked and possible)."""

    def __init__(self, gallery: np.ndarray, use_gpu: bool | None = None):
        self.cpu = faiss.IndexFlatIP(gallery.shape[1])
        self.cpu.add(gallery)
        self.size = len(gallery)
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.gpu = None
        if (gpus > 0 if use_gpu is None else use_gpu) and gpus > 0:
            log.info("exact search on %d GPU(s)", gpus)
            self.gpu = faiss.index_cpu_to_all_gpus(self.cpu)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # GPU k-selection is limited; larger k runs on the CPU copy.
        index = self.gpu if self.gpu is not None and k <= GPU_MAX_K else self.cpu
        return index.search(queries, k)


def sort_neighbours(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order rows by decreasing score, ties by increasing index (faiss leaves ties unordered).

    faiss already returns each row by decreasing score, so only rows holding a tie are
    re-sorted (a full lexsort of every row would cost more than the search).
    """
    descending = (scores[:, 1:] <= scores[:, :-1]).all(axis=1)
    rows = np.flatnonzero(~descending | (scores[:, 1:] == scores[:, :-1]).any(axis=1))
    if len(rows) == 0:
        return scores, indices
    order = np.lexsort((indices[rows], -scores[rows]), axis=-1)
    scores, indices = scores.copy(), indices.copy()
    scores[rows] = np.take_along_axis(scores[rows], order, 1)
    indices[rows] = np.take_along_axis(indices[rows], order, 1)
    return scores, indices


def top_neighbours(search: ExactSearch, queries: np.ndarray, need: int) -> np.ndarray:
    """The ``need`` best gallery indices per query, ties broken by index, lowest first.

    faiss keeps an arbitrary subset of a group of equal scores that straddles its cut-off,
    so a row whose ``need``-th score equals its last returned score is searched again
    with twice as many neighbours until the group is complete (or the gallery exhausted).
    Only exact duplicates (or equal similarities) ever trigger this.
    """
    k = min(need + 1, search.size)
    neighbours = np.empty((len(queries), need), dtype=np.int64)
    pending = np.arange(len(queries))
    while len(pending):
        scores, indices = sort_neighbours(*search.search(queries[pending], k))
        neighbours[pending] = indices[:, :need]
        if k >= search.size:
            break
        # scores are sorted, so the cut-off group is complete when it beats the last score.
        pending = pending[scores[:, need - 1] <= scores[:, -1]]
        k = min(2 * k, search.size)
    return neighbours


def drop_self(indices: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """Remove each query's own index from its row of ``k + 1`` neighbours -> ``k`` columns.

    A row that does not contain the query (it tied with, and lost to, ``k + 1`` others)
    drops its last column instead, which is then the correct ranking without the query.
    """
    is_self = indices == query_ids[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # A row can hold its own index at most once, so exactly one column goes per row.
    return indices[~is_self].reshape(len(indices), indices.shape[1] - 1)


def nearest_neighbours(
    queries: np.ndarray,
    search: ExactSearch,
    k: int,
    query_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the ``k`` most similar gallery items per query, ties broken by index.

    ``query_ids`` (single-set protocol): the queries' own positions in the gallery, which
    are excluded by index; ``k + 1`` neighbours are searched to make room.
    """
    if query_ids is None:
        return top_neighbours(search, queries, k)
    return drop_self(top_neighbours(search, queries, k + 1), query_ids)


# --------------------------------------------------------------------------- metrics


def per_query_metrics(
    relevant: np.ndarray, r: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Each metric per query; ``relevant`` is (n, k) bool by rank, ``r`` (n,) with r >= 1."""
    ranks = np.arange(1, relevant.shape[1] + 1)
    hits_within_r = relevant & (ranks[None, :] <= r[:, None])
    precision_at_i = np.cumsum(relevant, axis=1) / ranks[None, :]
    metrics = {f"recall@{q}": relevant[:, :q].any(axis=1).astype(np.float64) for q in ks}
    metrics["map@r"] = np.where(hits_within_r, precision_at_i, 0.0).sum(axis=1) / r
    metrics["r_precision"] = hits_within_r.sum(axis=1) / r
    return metrics


def _auto_chunk(k: int) -> int:
    return int(max(1, min(MAX_CHUNK, RESULTS_PER_CHUNK // max(k, 1))))


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: Sequence | np.ndarray,
    gallery_emb: np.ndarray | None = None,
    gallery_labels: Sequence | np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
    use_gpu: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Recall@K, MAP@R and R-Precision of cosine retrieval.

    Without a gallery, every query searches all *other* queries (single-set protocol);
    with one, queries search the gallery only. Returns floats ``recall@K`` for each K,
    ``map@r`` and ``r_precision`` (NaN when no query has a relevant item), plus counts:
    ``queries``, ``gallery``, ``queries_evaluated``, ``queries_without_positives``
    (R = 0, excluded as pytorch-metric-learning does), ``neighbours`` searched, and
    ``protocol``.
    """
    ks = _check_ks(ks)
    queries = unit_rows(query_emb, "query embeddings")
    q_labels = _check_labels(query_labels, len(queries), "query labels")
    single = gallery_emb is None
    if single:
        if gallery_labels is not None:
            raise UnicomError("gallery labels given without gallery embeddings")
        gallery, g_labels = queries, q_labels
        q_codes = g_codes = encode_labels(q_labels)[0]
    else:
        if gallery_labels is None:
            raise UnicomError("gallery embeddings given without gallery labels")
        gallery = unit_rows(gallery_emb, "gallery embeddings")
        g_labels = _check_labels(gallery_labels, len(gallery), "gallery labels")
        if gallery.shape[1] != queries.shape[1]:
            raise UnicomError(
                f"query and gallery embeddings differ in dimension: "
                f"{queries.shape[1]} vs {gallery.shape[1]}"
            )
        q_codes, g_codes = encode_labels(q_labels, g_labels)

    counts = np.bincount(g_codes, minlength=int(max(q_codes.max(initial=-1), 0)) + 1)
    r = counts[q_codes] - (1 if single else 0)
    evaluated = np.flatnonzero(r > 0)
    candidates = len(gallery) - (1 if single else 0)
    k = int(min(max(max(ks), int(r.max(initial=0))), candidates))
    result: dict[str, Any] = {
        "protocol": "single" if single else "query_gallery",
        "queries": len(queries),
        "gallery": len(gallery),
        "queries_evaluated": len(evaluated),
        "queries_without_positives": len(queries) - len(evaluated),
        "neighbours": k,
    }
    names = [f"recall@{q}" for q in ks] + ["map@r", "r_precision"]
    if len(evaluated) == 0 or k < 1:
        log.warning("no query has a relevant item in the gallery: metrics are NaN")
        return {**{name: math.nan for name in names}, **result}

    if chunk_size is not None and chunk_size < 1:
        raise UnicomError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = chunk_size or _auto_chunk(k)
    search = ExactSearch(gallery, use_gpu)
    # Per-query values, averaged once at the end: the result does not depend on chunking.
    values = {name: np.empty(len(evaluated)) for name in names}
    starts = range(0, len(evaluated), chunk)
    for start in tqdm(starts, desc="retrieval", unit="chunk", disable=not progress):
        ids = evaluated[start : start + chunk]
        neighbours = nearest_neighbours(queries[ids], search, k, ids if single else None)
        relevant = g_codes[neighbours] == q_codes[ids][:, None]
        for name, value in per_query_metrics(relevant, r[ids], ks).items():
            values[name][start : start + len(ids)] = value
    return {**{name: float(values[name].mean()) for name in names}, **result}


def truncate(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """The first ``dim`` coordinates, re-normalised (compactness of a Matryoshka-style prefix)."""
    return unit_rows(np.asarray(embeddings)[:, :dim])


def evaluate_dims(
    query_emb: np.ndarray,
    query_labels: Sequence | np.ndarray,
    gallery_emb: np.ndarray | None = None,
    gallery_labels: Sequence | np.ndarray | None = None,
    dims: Sequence[int | str] = DEFAULT_DIMS,
    **kwargs: Any,
) -> dict[str, Any]:
    """``retrieval_metrics`` on the full embeddings and on their first ``d`` dimensions.

    Returns ``{"embedding_dim": D, "results": {"full": {...}, "128": {...}},
    "skipped": {"1024": "not below the embedding dimension 768"}}``; dims >= D are
    skipped (they would repeat "full").
    """
    full_dim = np.asarray(query_emb).shape[-1]
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for dim in dims:
        if dim == "full":
            results["full"] = retrieval_metrics(
                query_emb, query_labels, gallery_emb, gallery_labels, **kwargs
            )
            continue
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise UnicomError(f"dims: expected 'full' or a positive integer, got {dim!r}")
        if dim >= full_dim:
            skipped[str(dim)] = f"not below the embedding dimension {full_dim}"
            log.info("dim %d skipped: not below the embedding dimension %d", dim, full_dim)
            continue
        results[str(dim)] = retrieval_metrics(
            truncate(query_emb, dim),
            query_labels,
            None if gallery_emb is None else truncate(gallery_emb, dim),
            gallery_labels,
            **kwargs,
        )
    return {"embedding_dim": int(full_dim), "results": results, "skipped": skipped}


# --------------------------------------------------------------------------- CLI


def read_embeddings(path: Path, emb_column: str, label_column: str) -> tuple[np.ndarray, list]:
    """Embeddings (fixed-size-list column) and labels from a Parquet file."""
    if not path.is_file():
        raise UnicomError(f"{path}: no such file")
    names = pq.read_schema(path).names
    for column in (emb_column, label_column):
        if column not in names:
            raise UnicomError(f"{path}: missing column {column!r} (has {names})")
    table = pq.read_table(path, columns=[emb_column, label_column])
    return column_to_numpy(table[emb_column]), table[label_column].to_pylist()


def json_safe(value: Any) -> Any:
    """NaN -> None, recursively: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _dim(text: str) -> int | str:
    return "full" if text == "full" else int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unicom.evaluate.metrics",
        description="Recall@K, MAP@R and R-Precision of embeddings stored in Parquet.",
    )
    parser.add_argument("queries", type=Path, help="Parquet with embeddings and labels")
    parser.add_argument(
        "--gallery", type=Path, help="separate gallery Parquet (default: single-set protocol)"
    )
    parser.add_argument("--emb-column", default="emb")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--dims", type=_dim, nargs="+", default=list(DEFAULT_DIMS))
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True, help="metrics JSON")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    query_emb, query_labels = read_embeddings(args.queries, args.emb_column, args.label_column)
    gallery_emb = gallery_labels = None
    if args.gallery is not None:
        gallery_emb, gallery_labels = read_embeddings(
            args.gallery, args.emb_column, args.label_column
        )
    result = evaluate_dims(
        query_emb,
        query_labels,
        gallery_emb,
        gallery_labels,
        dims=args.dims,
        ks=args.ks,
        chunk_size=args.chunk_size,
        progress=True,
    )
    write_json(args.out, json_safe(result))
    full = result["results"].get("full") or next(iter(result["results"].values()), {})
    log.info(
        "%s",
        " ".join(f"{key}={value:.4f}" for key, value in full.items() if isinstance(value, float)),
    )


if __name__ == "__main__":
    run_cli(main)
