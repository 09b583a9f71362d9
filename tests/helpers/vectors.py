"""Unit vectors in clusters, and fused Parquet files of them (what k-means and assign read)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unicom import formats


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def blobs(clusters: int, per_cluster: int, dim: int = 32, noise: float = 0.05, seed: int = 0):
    """Unit vectors around ``clusters`` random directions; returns (vectors, true labels)."""
    rng = np.random.default_rng(seed)
    centers = unit(rng.normal(size=(clusters, dim)))
    truth = np.repeat(np.arange(clusters), per_cluster)
    vectors = unit(centers[truth] + noise * rng.normal(size=(len(truth), dim)))
    order = rng.permutation(len(truth))
    return vectors[order], truth[order]


def write_fused(path, vectors, part="00000", column="emb", row_group_size=None, **columns):
    keys = [formats.global_key(part, f"{i:09d}") for i in range(len(vectors))]
    table = pa.table(
        {"key": pa.array(keys, pa.string()), **columns, column: formats.embedding_array(vectors)}
    )
    table = formats.with_metadata(table, {formats.FUSION_METADATA_KEY: {"mode": "concat"}})
    pq.write_table(table, path, row_group_size=row_group_size)
    return keys


def split_files(tmp_path, vectors, parts=3):
    paths = []
    for i, chunk in enumerate(np.array_split(vectors, parts)):
        path = tmp_path / f"{formats.part_name(i)}.parquet"
        write_fused(path, chunk, formats.part_name(i))
        paths.append(str(path))
    return paths
