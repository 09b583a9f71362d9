"""What the embed stage keeps of a shard and how it leaves: the encoders' outputs of each batch,
copied back from the GPU without waiting for it; the Parquet table; and a writer thread that
writes a finished shard while the GPU goes on with the next one."""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from unicom import formats
from unicom.decoding import PendingImages
from unicom.encoders.base import Encoder
from unicom.io import atomic_path, write_parquet
from unicom.vectors import l2_normalize

if TYPE_CHECKING:
    from unicom.embed.embed import Batch

log = logging.getLogger("unicom.embed.results")

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


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """A GPU tensor's copy into pinned host memory, queued behind the work that makes it."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


@dataclass
class ShardEmbeddings:
    """One shard's rows as its batches come, both towers per batch; the float16 embeddings
    come back from a GPU asynchronously, and ``result`` is the only place that waits."""

    encoder: Encoder
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    urls: list[str | None] = field(default_factory=list)
    parts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    done: torch.cuda.Event | None = None
    waited: float = 0.0  # seconds waiting for the loader
    seconds: float = 0.0  # seconds of the shard in the main loop, waits included

    def add(self, batch: Batch) -> None:
        self.skipped.extend(batch.skipped)
        if not batch.keys:
            return
        keys, captions, urls = batch.keys, batch.captions, batch.urls
        images = batch.images
        if isinstance(images, PendingImages):  # embed.decode cuda
            failed: list[tuple[int, str]] = []
            images = images.finish(self.encoder.device, failed)
            if failed:
                bad = {row for row, _ in failed}
                self.skipped += [(keys[row], f"undecodable jpg: {why}") for row, why in failed]
                keep = [row for row in range(len(keys)) if row not in bad]
                keys, captions, urls = ([v[r] for r in keep] for v in (keys, captions, urls))
                images = images[torch.tensor(keep, dtype=torch.long, device=images.device)]
        if not keys:
            return
        image = self.encoder.image_embeddings(images).to(torch.float16)
        text = self.encoder.text_embeddings(captions).to(torch.float16)
        self.parts.append((_host(image), _host(text)))
        if image.device.type == "cuda":
            self.done = torch.cuda.Event()
            self.done.record()
        self.keys += keys
        self.captions += captions
        self.urls += urls

    def result(self) -> EmbedResult:
        if self.done is not None:
            self.done.synchronize()
        dims = self.encoder.image_dim, self.encoder.text_dim
        stacked = [
            torch.cat([part[side] for part in self.parts]).numpy()
            if self.parts
            else np.zeros((0, dims[side]), dtype=np.float16)
            for side in (0, 1)
        ]
        return EmbedResult(
            self.keys, self.captions, self.urls, stacked[0], stacked[1], self.skipped
        )


def result_table(result: EmbedResult, identity: dict[str, Any]) -> pa.Table:
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


class ShardWriter:
    """Writes finished shards, in order, on a thread of its own: the wait for a shard's last
    embeddings and its Parquet happen there while the main thread feeds the GPU the next."""

    def __init__(self, identity: dict[str, Any]):
        self.identity = identity
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="embed-writer")
        self.written: list[Future] = []

    def submit(self, shard: str, out: str, collected: ShardEmbeddings) -> None:
        self.written.append(self.pool.submit(self._write, shard, out, collected))

    def _write(self, shard: str, out: str, collected: ShardEmbeddings) -> EmbedResult:
        result = collected.result()
        write_parquet(out, result_table(result, self.identity))
        seconds, waited = collected.seconds, collected.waited
        log.info(
            "%s: embedded %d images, skipped %d, in %.1f s (%.1f img/s, %.0f%% of it waiting "
            "for data) -> %s",
            shard,
            result.rows,
            len(result.skipped),
            seconds,
            result.rows / seconds if seconds > 0 else float("nan"),
            100 * waited / seconds if seconds > 0 else float("nan"),
            out,
        )
        return result

    def close(self) -> list[EmbedResult]:
        """Waits for every shard; raises the first writing error."""
        self.pool.shutdown(wait=True)
        return [future.result() for future in self.written]
