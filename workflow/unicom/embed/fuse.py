"""Fuse image and text embeddings into the one vector per sample that k-means clusters.

The paper clusters joint image+text CLIP features; ``mean`` is only meaningful when both
sides live in one space (a single CLIP model), ``concat`` works for any encoder pair.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unicom import formats
from unicom.cli import check_pairs, run_cli, setup_logging
from unicom.config import section_options
from unicom.errors import UnicomError
from unicom.io import write_parquet
from unicom.options import StageOptions
from unicom.vectors import l2_normalize

MODES = ("image", "text", "mean", "concat")
log = logging.getLogger("unicom.embed.fuse")
OPTIONS = StageOptions("fuse")


def fuse_embeddings(
    image: np.ndarray,
    text: np.ndarray,
    mode: str,
    image_weight: float = 1.0,
    text_weight: float = 1.0,
) -> np.ndarray:
    """(n, d_img), (n, d_txt) -> (n, d) L2-normalised float32 fused embeddings."""
    if len(image) != len(text):
        raise UnicomError(f"fuse: {len(image)} image but {len(text)} text embeddings")
    image = l2_normalize(image.astype(np.float32))
    text = l2_normalize(text.astype(np.float32))
    if mode == "image":
        fused = image
    elif mode == "text":
        fused = text
    elif mode == "mean":
        if image.shape[1] != text.shape[1]:
            raise UnicomError(
                f"fuse.mode 'mean' needs equal dimensions, got image {image.shape[1]} "
                f"and text {text.shape[1]}; use 'concat'"
            )
        fused = image_weight * image + text_weight * text
    elif mode == "concat":
        fused = np.concatenate([image_weight * image, text_weight * text], axis=1)
    else:
        raise UnicomError(f"fuse.mode: unknown mode {mode!r}, expected one of {MODES}")
    return l2_normalize(fused)


def fuse_file(src: str, dst: str, options: dict[str, Any]) -> int:
    """Fuse one shard's embedding Parquet into ``dst``; return the number of rows."""
    options = section_options("fuse", options)
    mode = options["mode"]
    identity = formats.read_metadata(src, formats.ENCODER_METADATA_KEY)
    if identity is None:
        raise UnicomError(
            f"{src}: no encoder identity in the Parquet metadata (not an embed output)"
        )
    if mode == "mean" and not identity.get("shared_space", False):
        raise UnicomError(
            f"{src}: fuse.mode 'mean' needs image and text from one CLIP model, but this file was "
            "embedded with separate encoders; use 'concat'"
        )
    table = pq.read_table(src, columns=["key", "image_emb", "text_emb"])
    fused = fuse_embeddings(
        formats.column_to_numpy(table["image_emb"]),
        formats.column_to_numpy(table["text_emb"]),
        mode,
        options["image_weight"],
        options["text_weight"],
    )
    out = pa.table({"key": table["key"], "emb": formats.embedding_array(fused)})
    out = formats.with_metadata(
        out, {formats.FUSION_METADATA_KEY: options, formats.ENCODER_METADATA_KEY: identity}
    )
    write_parquet(dst, out)
    return out.num_rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.embed.fuse", description=__doc__)
    parser.add_argument("--embeddings", nargs="+", required=True, help="embed Parquet per shard")
    parser.add_argument("--out", nargs="+", required=True, help="fused Parquet per shard")
    OPTIONS.add_to(parser)
    args = parser.parse_args(argv)
    options = OPTIONS.from_args(args)
    setup_logging()
    check_pairs("--embeddings", args.embeddings, "--out", args.out)
    for embeddings, out in zip(args.embeddings, args.out, strict=True):
        rows = fuse_file(embeddings, out, options)
        log.info("fused %d rows of %s with mode %s -> %s", rows, embeddings, options["mode"], out)


if __name__ == "__main__":
    run_cli(main)
