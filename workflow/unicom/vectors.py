"""Embedding vectors on disk and in faiss: shape checks, unit rows, centroid files and the
nearest-centroid search that k-means, assignment and the cluster reports share."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unicom import formats
from unicom.errors import UnicomError
from unicom.io import atomic_path


@dataclass(frozen=True)
class EmbeddingFile:
    path: str
    rows: int
    dim: int


def inspect_files(
    paths: Sequence[str], column: str = formats.EMBEDDING_COLUMN
) -> list[EmbeddingFile]:
    """Row count and dimension of each file from its Parquet metadata (no data read).

    Raises UnicomError naming the file for a missing or malformed column or a dimension that
    differs from the first file's. An empty file is fine: a part whose every download failed.
    """
    if not paths:
        raise UnicomError("no embedding files given")
    files = []
    for path in paths:
        try:
            schema = pq.read_schema(path)
            rows = pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowInvalid) as err:
            raise UnicomError(f"{path}: not a readable Parquet file ({err})") from None
        if column not in schema.names:
            raise UnicomError(f"{path}: no column '{column}'")
        field_type = schema.field(column).type
        if not pa.types.is_fixed_size_list(field_type):
            raise UnicomError(f"{path}: column '{column}' is {field_type}, not a fixed-size list")
        files.append(EmbeddingFile(str(path), rows, field_type.list_size))
        if files[-1].dim != files[0].dim:
            raise UnicomError(
                f"{path}: column '{column}' has dimension {files[-1].dim}, but "
                f"{files[0].path} has {files[0].dim}"
            )
    return files


def check_finite(
    vectors: np.ndarray, path: str, where: Callable[[int], str] = lambda i: f"row {i}"
) -> None:
    """NaN/inf anywhere is an error naming the file and the first bad row (``where(i)``)."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        first = where(int(np.flatnonzero(bad)[0]))
        raise UnicomError(
            f"{path}: {int(bad.sum())} vector(s) with NaN/inf values (first: {first})"
        )


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero (cosine 0 to everything)."""
    # float16 storage leaves norms at 1 +- 1e-3; spherical k-means wants exact unit vectors.
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def read_rows(path: str, column: str, indices: np.ndarray) -> np.ndarray:
    """Rows ``indices`` (sorted) of an embedding column, reading only the row groups needed."""
    parquet = pq.ParquetFile(path)
    chunks, start = [], 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        lo, hi = np.searchsorted(indices, [start, start + size])
        if hi > lo:
            values = parquet.read_row_group(group, columns=[column]).column(column)
            chunks.append(formats.column_to_numpy(values.take(pa.array(indices[lo:hi] - start))))
        start += size
    dim = parquet.schema_arrow.field(column).type.list_size
    return np.concatenate(chunks) if chunks else np.empty((0, dim), np.float32)


def resolve_gpu(setting: str | bool) -> bool:
    """``auto`` -> GPU when faiss sees one; ``true`` without one is an error."""
    setting = str(setting).lower()
    available = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if setting == "auto":
        return available
    if setting == "true":
        if not available:
            raise UnicomError(
                "config key gpu: true, but faiss sees no GPU (faiss-cpu installed, or no GPU "
                "visible to this job); use auto or false"
            )
        return True
    if setting == "false":
        return False
    raise UnicomError(f"config key gpu: {setting!r} is not one of auto, true, false")


def tune_faiss(threads: int | None = None) -> None:
    """Give faiss the job's threads (its OpenMP default is every core of the node).

    faiss's own BLAS blocking is kept: larger blocks measured no faster (bench/kmeans.py).
    """
    if threads:
        faiss.omp_set_num_threads(threads)


def centroid_index(centroids: np.ndarray, gpu: bool) -> faiss.Index:
    index = faiss.IndexFlatIP(centroids.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def search_centroids(
    index: faiss.Index, x: np.ndarray, topk: int = 1, batch_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, labels), each (n, topk), best first, by inner product, in batches."""
    sims = np.empty((len(x), topk), dtype=np.float32)
    labels = np.empty((len(x), topk), dtype=np.int64)
    for start in range(0, len(x), batch_size):
        batch = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
        sims[start : start + len(batch)], labels[start : start + len(batch)] = index.search(
            batch, topk
        )
    return sims, labels


def centroids_digest(centroids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(centroids, dtype=np.float32).tobytes()).hexdigest()


def save_centroids(path: str | Path, centroids: np.ndarray) -> None:
    # A file handle, because np.save appends '.npy' to a path that lacks it (the temp name).
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(centroids, dtype=np.float32))


def load_centroids(path: str | Path) -> np.ndarray:
    try:
        centroids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UnicomError(f"{path}: not a centroids .npy file ({err})") from None
    if centroids.ndim != 2 or centroids.shape[0] < 1:
        raise UnicomError(f"{path}: expected a (k, d) array of centroids, got {centroids.shape}")
    check_finite(centroids, str(path))
    return centroids.astype(np.float32, copy=False)
