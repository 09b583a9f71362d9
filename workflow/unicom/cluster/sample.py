"""The k-means training sample: a seeded uniform sample of at most ``k x max_points_per_centroid``
rows of the fused files, read row group by row group (the corpus is never in memory at once).
Both backends draw the same sample; the torch backend's ranks each read a contiguous slice."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from unicom import formats
from unicom.errors import UnicomError
from unicom.vectors import EmbeddingFile, check_finite, l2_normalize, read_rows


def check_enough_vectors(files: Sequence[EmbeddingFile], k: int, total: int | None = None) -> None:
    total = sum(f.rows for f in files) if total is None else total
    if k > total:
        where = files[0].path if len(files) == 1 else f"{files[0].path} .. {files[-1].path}"
        raise UnicomError(
            f"kmeans.k = {k} exceeds the {total} vectors in {len(files)} file(s) ({where})"
        )


def sample_plan(rows: Sequence[int], max_points: int, seed: int) -> list[np.ndarray]:
    """Sorted row indices to read from each file: a seeded uniform sample of ``max_points``.

    Equivalent to drawing ``max_points`` distinct global indices, but in memory proportional
    to the sample: a multivariate hypergeometric draw splits the sample among the files, then
    each file draws its own rows. Every row is taken when the total fits.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.sum() <= max_points:
        return [np.arange(n, dtype=np.int64) for n in rows]
    rng = np.random.default_rng(seed)
    per_file = rng.multivariate_hypergeometric(rows, max_points, method="marginals")
    return [
        np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64)
        for n, m in zip(rows, per_file, strict=True)
    ]


def kept_rows(files: Sequence[EmbeddingFile], skip_files: Sequence[str]) -> list[np.ndarray] | None:
    """Per file, the row indices not dropped by the screen (``skip_files``: drops files); None
    when nothing is skipped. The drops are read once, sorted by part; each file's key column
    is matched against its own part's slice of them."""
    if not skip_files:
        return None
    from unicom import drops  # only runs that screen pay for the import

    names = [os.path.basename(file.path).removesuffix(".parquet") for file in files]
    skipped = drops.read(skip_files, names).sort_by("part")
    parts = skipped["part"].to_numpy(zero_copy_only=False)
    kept = []
    for file, part in zip(files, names, strict=True):
        start, end = np.searchsorted(parts, part, "left"), np.searchsorted(parts, part, "right")
        skip = skipped["key"].slice(int(start), int(end - start))
        keys = pq.read_table(file.path, columns=["key"])["key"]
        kept.append(np.flatnonzero(~pc.is_in(keys, value_set=skip).to_numpy(zero_copy_only=False)))
    return kept


def planned_sample(
    files: Sequence[EmbeddingFile], max_points: int, seed: int, skip_files: Sequence[str] = ()
) -> tuple[list[np.ndarray], int]:
    """The sample plan over the rows the screen kept, and how many rows it kept."""
    kept = kept_rows(files, skip_files)
    if kept is None:
        return sample_plan([f.rows for f in files], max_points, seed), sum(f.rows for f in files)
    plan = sample_plan([len(k) for k in kept], max_points, seed)
    return [k[p] for k, p in zip(kept, plan, strict=True)], sum(len(k) for k in kept)


def read_sample(
    files: Sequence[EmbeddingFile],
    plan: Sequence[np.ndarray],
    column: str = formats.EMBEDDING_COLUMN,
) -> np.ndarray:
    """The planned rows of every file as one (n, d) float32 array of unit vectors."""
    total = sum(len(p) for p in plan)
    sample = np.empty((total, files[0].dim), dtype=np.float32)
    offset = 0
    for file, indices in tqdm(
        list(zip(files, plan, strict=True)), desc="read sample", unit="file", mininterval=5
    ):
        if len(indices) == 0:
            continue
        vectors = read_rows(file.path, column, indices)
        check_finite(vectors, file.path, lambda i, rows=indices: f"row {rows[i]}")
        sample[offset : offset + len(vectors)] = l2_normalize(vectors)
        offset += len(vectors)
    return sample


# Clusters with fewer sample points than this fraction of the mean size count as tiny.
TINY_FRACTION = 0.1


def cluster_size_summary(sizes: np.ndarray) -> dict[str, Any]:
    tiny_below = max(1, math.ceil(TINY_FRACTION * sizes.mean()))
    return {
        "min": int(sizes.min()),
        "median": float(np.median(sizes)),
        "max": int(sizes.max()),
        "empty": int((sizes == 0).sum()),
        "tiny": int(((sizes > 0) & (sizes < tiny_below)).sum()),
        "tiny_means_fewer_than": tiny_below,
    }
