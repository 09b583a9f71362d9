"""What the embed stage keeps of a shard and how it leaves: the encoders' outputs of each batch,
copied back from the GPU without waiting for it, and a writer thread that writes a finished
shard (unicom.embed.outputs' table) while the GPU goes on with the next one."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from unicom.decoding import PendingImages
from unicom.embed.outputs import EmbedResult, result_table
from unicom.encoders.base import Encoder
from unicom.io import write_parquet

if TYPE_CHECKING:
    from unicom.embed.embed import Batch

log = logging.getLogger("unicom.embed.results")


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
