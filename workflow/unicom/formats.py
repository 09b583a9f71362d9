"""Shared on-disk formats: defined once here and imported by every stage.

Layout under the output folder (``config['output_dir']``):

- ``parts/{part}.parquet``     URL-list part: ``url``, ``caption`` + carried extra columns
- ``shards/{part}.tar``        webdataset shard written by img2dataset (``{key}.jpg``, ``.txt``, ``.json``)
- ``shards/{part}.parquet``    img2dataset's per-row status table for the part
- ``shards/{part}.summary.json`` accounting: every input row counted once, by status
- ``embed/{part}.parquet``     ``EMBED_COLUMNS``; encoder identity in the file metadata
- ``fused/{part}.parquet``     ``key``, ``emb``
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unicom.errors import UnicomError

URL_COLUMN = "url"
CAPTION_COLUMN = "caption"
# The vector column of fused files: what k-means clusters and assign labels.
EMBEDDING_COLUMN = "emb"
# embed, with one CLIP model for image and caption: their cosine (filters.clip_score_min).
CLIP_SCORE_COLUMN = "clip_score"
# webdataset members that hold the image, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Metadata key under which embedding files record the encoder that produced them.
ENCODER_METADATA_KEY = b"unicom.encoder"
FUSION_METADATA_KEY = b"unicom.fusion"
# ... and assignment files the k-means run (its centroids digest, k) that labelled them.
ASSIGN_METADATA_KEY = b"unicom.assign"

PART_WIDTH = 5


# split_urls (hygiene.dedup_urls): the key of the URL's first row, on each later copy.
DUPLICATE_OF_COLUMN = "duplicate_of"


def part_name(index: int) -> str:
    """Name of the URL-list part / shard ``index`` (also its webdataset shard name)."""
    return f"{index:0{PART_WIDTH}d}"


def global_key(part: str, local_key: str) -> str:
    """Sample key unique across all shards.

    img2dataset numbers samples within one call, and each part is downloaded by its own
    call, so its keys repeat across parts; the part name makes them unique.
    """
    return f"{part}_{local_key}"


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float array -> fixed-size-list<float16>[d] column."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of embeddings, got shape {vectors.shape}")
    flat = pa.array(vectors.reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def column_to_numpy(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """fixed-size-list column -> (n, d) numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise UnicomError(f"expected a fixed-size-list embedding column, got {column.type}")
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(dtype, copy=False)


def with_metadata(table: pa.Table, metadata: Mapping[bytes, Any]) -> pa.Table:
    """Attach JSON-encoded values to the table's schema metadata."""
    merged = dict(table.schema.metadata or {})
    merged.update({k: json.dumps(v, sort_keys=True).encode() for k, v in metadata.items()})
    return table.replace_schema_metadata(merged)


def read_metadata(path: str, key: bytes) -> Any:
    """Read one JSON value from a Parquet file's schema metadata (None if absent)."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(key)
    return None if raw is None else json.loads(raw)


def batch_name(part: str, shards_per_job: int) -> str:
    """The job batch of a part: its name without the last log10(shards_per_job) digits
    (``00127`` is in batch ``0012`` with 10 shards per job, in ``00127`` with 1)."""
    digits = len(str(shards_per_job)) - 1
    return part[: len(part) - digits] if digits else part


def read_manifest(parts_dir: str | os.PathLike) -> dict[str, Any]:
    """split_urls' ``PARTS_DIR/manifest.json``, checked to list its parts."""
    manifest_path = Path(parts_dir) / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["parts"] = list(manifest["parts"])
        manifest["shards_per_job"] = int(manifest.get("shards_per_job", 1))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UnicomError(f"{manifest_path}: not a split_urls manifest ({err})") from None
    return manifest


# What evaluate/summary.csv calls each protocol (the evaluate, finetune and probe stages).
ZERO_SHOT = "zero-shot retrieval"
FINE_TUNED = "fine-tuned retrieval"
LINEAR_PROBE = "linear probe"

# model.json's "format" of an export of unicom.train (unicom.models writes and reads it).
MODEL_FORMAT = "unicom-trained-model/1"


def read_export_info(directory: str | os.PathLike, key: str) -> dict[str, Any]:
    """model.json of a ``unicom.train`` export folder; errors start with ``key`` (what named
    the folder: a config key, an argument)."""
    path = Path(directory) / "model.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UnicomError(
            f"{key} {directory} is not a unicom.train export ({path}: {err})"
        ) from None
    if not isinstance(info, dict) or info.get("format") != MODEL_FORMAT:
        raise UnicomError(f"{key} {directory}: {path} is not a {MODEL_FORMAT} description")
    return info
