"""Pseudo-label shards: the nearest k-means centroid of each fused embedding.

Writes ``assign/{part}.parquet`` with ``key``, ``label`` (int32), ``sim`` (cosine to that
centroid) and ``sim2`` (cosine to the second nearest, so that training can drop ambiguous
samples whose margin ``sim - sim2`` is small), and ``labels``/``sims``: the
``assign.top_labels`` nearest centroids and their cosines, nearest first (MLCD's positives), in
the fused file's key order. Exact search
(faiss IndexFlatIP), on all visible GPUs when there are any.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unicom import formats
from unicom.cli import check_pairs, parse_options_json, run_cli, setup_logging
from unicom.config import section_options
from unicom.errors import UnicomError
from unicom.gpus import claim_gpu
from unicom.io import write_parquet
from unicom.options import StageOptions
from unicom.vectors import (
    centroid_index,
    centroids_digest,
    check_finite,
    inspect_files,
    l2_normalize,
    load_centroids,
    resolve_gpu,
    search_centroids,
    tune_faiss,
)

log = logging.getLogger("unicom.cluster.assign")
OPTIONS = StageOptions("assign")


def nearest_labels(
    vectors: np.ndarray,
    centroids: np.ndarray,
    top: int = 2,
    gpu: bool = False,
    batch_size: int = 65536,
    index: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) unit vectors -> the ``top`` nearest centroids (n, top) int32 and their cosines
    (n, top) float32, nearest first.

    ``index`` is ``centroid_search(...)`` when the caller labels several shards.
    """
    if len(centroids) < max(top, 2):
        raise UnicomError(
            f"need at least {max(top, 2)} centroids for the {top} nearest (assign.top_labels), "
            f"got {len(centroids)}"
        )
    if isinstance(index, TorchSearch):
        sims, labels = index.search(vectors, top)
    else:
        index = index if index is not None else centroid_index(centroids, gpu)
        sims, labels = search_centroids(index, vectors, top, batch_size)
    return labels.astype(np.int32), sims.astype(np.float32)


def assign_vectors(
    vectors: np.ndarray,
    centroids: np.ndarray,
    gpu: bool = False,
    batch_size: int = 65536,
    index: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, d) unit vectors -> (label int32, sim float32, second-best sim float32)."""
    labels, sims = nearest_labels(vectors, centroids, 2, gpu, batch_size, index)
    return labels[:, 0].copy(), sims[:, 0].copy(), sims[:, 1].copy()


def assignment_table(keys: pa.ChunkedArray, labels: np.ndarray, sims: np.ndarray) -> pa.Table:
    """key, label, sim, sim2 (the nearest two) and labels, sims (all ``top``, nearest first)."""
    top = labels.shape[1]
    return pa.table(
        {
            "key": keys,
            "label": pa.array(labels[:, 0], pa.int32()),
            "sim": pa.array(sims[:, 0], pa.float32()),
            "sim2": pa.array(sims[:, 1], pa.float32()),
            "labels": pa.FixedSizeListArray.from_arrays(
                pa.array(labels.reshape(-1), pa.int32()), top
            ),
            "sims": pa.FixedSizeListArray.from_arrays(
                pa.array(sims.reshape(-1), pa.float32()), top
            ),
        }
    )


class TorchSearch:
    """The nearest centroids by chunked matmul on ``device`` (kmeans.backend: torch)."""

    def __init__(self, centroids: np.ndarray, kmeans: Mapping[str, Any]):
        import torch

        from unicom.devices import resolve_device

        self.torch = torch
        self.device = resolve_device(str(kmeans["device"]), "kmeans.device")
        self.centroids = torch.from_numpy(centroids).to(self.device)
        self.chunk, self.precision = kmeans["chunk"], kmeans["precision"]

    def search(self, vectors: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
        from unicom.cluster.torch_kmeans import nearest_centroids

        x = self.torch.from_numpy(np.ascontiguousarray(vectors)).to(self.device)
        sims, labels = nearest_centroids(x, self.centroids, top, self.chunk, self.precision)
        return sims.cpu().numpy(), labels.cpu().numpy()


def centroid_search(centroids: np.ndarray, gpu: bool, kmeans: Mapping[str, Any] | None) -> Any:
    """What labels the rows: faiss's flat index, or the torch search of kmeans.backend: torch."""
    if len(centroids) < 2:
        return None  # nearest_labels explains
    if kmeans is not None and kmeans["backend"] == "torch":
        return TorchSearch(centroids, kmeans)
    return centroid_index(centroids, gpu)


def read_vectors(
    path: str, column: str = formats.EMBEDDING_COLUMN
) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Keys and finite unit vectors of one embedding file (errors name the file)."""
    inspect_files([path], column)
    table = pq.read_table(path, columns=["key", column])
    vectors = formats.column_to_numpy(table[column])
    check_finite(vectors, path, lambda i: f"key {table['key'][i]}")
    return table["key"], l2_normalize(vectors)


def assign_files(
    fused_paths: Sequence[str],
    centroids_path: str,
    out_paths: Sequence[str],
    options: Mapping[str, Any],
    threads: int | None = None,
    kmeans: Mapping[str, Any] | None = None,
) -> list[pa.Table]:
    """Label every row of each fused file (centroids loaded once); write and return the tables.
    ``kmeans`` (the kmeans section) chooses the backend; faiss without it."""
    check_pairs("--fused", fused_paths, "--out", out_paths)
    options = section_options("assign", options)
    kmeans = None if kmeans is None else section_options("kmeans", kmeans)
    tune_faiss(threads)
    if str(options["gpu"]).lower() != "false":
        claim_gpu()  # one GPU per assign job, before faiss or torch sees them all
    gpu = resolve_gpu(options["gpu"])
    centroids = load_centroids(centroids_path)
    index = centroid_search(centroids, gpu, kmeans)
    digest = centroids_digest(centroids)
    tables = []
    for fused_path, out_path in zip(fused_paths, out_paths, strict=True):
        keys, vectors = read_vectors(fused_path)
        if vectors.shape[1] != centroids.shape[1]:
            raise UnicomError(
                f"{fused_path}: embeddings have dimension {vectors.shape[1]}, but the centroids "
                f"in {centroids_path} have {centroids.shape[1]} (rerun kmeans)"
            )
        labels, sims = nearest_labels(
            vectors, centroids, options["top_labels"], gpu, options["batch_size"], index
        )
        table = assignment_table(keys, labels, sims)
        identity = {
            "k": len(centroids),
            "d": centroids.shape[1],
            "centroids_sha256": digest,
            "top_labels": options["top_labels"],
            # How the clustered vectors were made, for reports downstream.
            "fusion": formats.read_metadata(fused_path, formats.FUSION_METADATA_KEY),
        }
        write_parquet(
            out_path, formats.with_metadata(table, {formats.ASSIGN_METADATA_KEY: identity})
        )
        log.info(
            "%s: %d rows -> %s (k=%d, %s, mean sim %.3f)",
            fused_path,
            table.num_rows,
            out_path,
            len(centroids),
            "GPU" if gpu else "CPU",
            float(sims[:, 0].mean()) if len(sims) else float("nan"),
        )
        tables.append(table)
    return tables


def assign_file(
    fused_path: str,
    centroids_path: str,
    out_path: str,
    options: Mapping[str, Any],
    threads: int | None = None,
    kmeans: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Label every row of one fused file; write and return the assignment table."""
    return assign_files([fused_path], centroids_path, [out_path], options, threads, kmeans)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.cluster.assign", description=__doc__)
    parser.add_argument("--fused", nargs="+", required=True, help="fused Parquet per shard")
    parser.add_argument(
        "--centroids", required=True, help="centroids.npy from unicom.cluster.kmeans"
    )
    parser.add_argument("--out", nargs="+", required=True, help="assignment Parquet per shard")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for faiss")
    parser.add_argument(
        "--kmeans-options-json",
        metavar="JSON",
        help="the kmeans section: its backend labels the rows too (keys: unicom.cluster.kmeans -h)",
    )
    OPTIONS.add_to(parser)
    args = parser.parse_args(argv)
    options = OPTIONS.from_args(args)
    setup_logging()
    kmeans = parse_options_json(args.kmeans_options_json) if args.kmeans_options_json else None
    if args.threads and kmeans is not None and kmeans.get("backend") == "torch":
        import torch

        torch.set_num_threads(args.threads)
    assign_files(
        args.fused,
        args.centroids,
        args.out,
        options,
        args.threads,
        kmeans,
    )


if __name__ == "__main__":
    run_cli(main)
