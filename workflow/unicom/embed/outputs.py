"""What an embed job writes, however its vectors were made (the encoders here, or the
precomputed files of data.embeddings): one Parquet per shard and the skipped samples' CSV.

Parquet columns: ``key``, ``caption``, ``url``, ``image_emb``, ``text_emb`` (fixed-size lists of
float16, L2-normalised), the encoder identity in the file metadata; with one CLIP model for
both sides (a shared space) also ``clip_score``, the image-caption cosine.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from unicom import formats
from unicom.io import atomic_path
from unicom.vectors import l2_normalize

SKIPPED_COLUMNS = ("key", "reason")


@dataclass
class EmbedResult:
    keys: list[str]
    captions: list[str]
    urls: list[str | None]
    image_emb: np.ndarray
    text_emb: np.ndarray
    skipped: list[tuple[str, str]]

    @property
    def rows(self) -> int:
        return len(self.keys)


def result_table(result: EmbedResult, identity: Mapping[str, Any]) -> pa.Table:
    """The Parquet table of one shard, with the encoder identity in its metadata."""
    columns = {
        "key": pa.array(result.keys, type=pa.string()),
        formats.CAPTION_COLUMN: pa.array(result.captions, type=pa.string()),
        formats.URL_COLUMN: pa.array(result.urls, type=pa.string()),
        "image_emb": formats.embedding_array(result.image_emb),
        "text_emb": formats.embedding_array(result.text_emb),
    }
    if identity.get("shared_space"):
        image = result.image_emb.astype(np.float32)
        text = result.text_emb.astype(np.float32)
        columns[formats.CLIP_SCORE_COLUMN] = pa.array(
            (l2_normalize(image) * l2_normalize(text)).sum(axis=1), pa.float32()
        )
    table = pa.table(columns)
    return formats.with_metadata(table, {formats.ENCODER_METADATA_KEY: dict(identity)})


def write_skipped_csv(path: str | os.PathLike, skipped: list[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SKIPPED_COLUMNS)
        writer.writerows(skipped)
