"""Embed webdataset shards: image and caption embeddings per sample -> one Parquet per shard.

Each shard (a tar written by img2dataset) is streamed; DataLoader workers decode and
transform images while the main process runs the encoders, loaded once for all the shards of
the job. Samples whose image cannot be decoded are skipped and listed, with the reason, in
one CSV for the job.

Output columns: ``key``, ``caption``, ``url``, ``image_emb``, ``text_emb`` (fixed-size lists
of float16, L2-normalised), rows in shard order, encoder identity in the file metadata; with
one CLIP model for both sides (a shared space) also ``clip_score``, the image-caption cosine
that LAION filtered on (``filters.clip_score_min``).
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch loads OpenMP)
from __future__ import annotations

import os

# OpenMP threads that finish a parallel region sleep instead of spinning, so the decoding
# worker (and other jobs on the node) get the cores they need. On 2 busy cores this halved
# the CPU time per image and doubled throughput. Read once, when torch is first imported:
# effective for `python -m unicom.embed.embed`; the environment can override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from unicom import formats
from unicom.cli import check_pairs, parse_options_json, run_cli, setup_logging
from unicom.config import section_options
from unicom.devices import resolve_device
from unicom.embed.outputs import EmbedResult, result_table, write_skipped_csv
from unicom.encoders import build_encoder
from unicom.encoders.base import Encoder
from unicom.errors import UnicomError
from unicom.faults import fail_once_if_marked
from unicom.io import write_parquet
from unicom.shards import TarSample, iter_samples, sample_image, scan_tar_samples
from unicom.workers import decoding_worker, iterate

log = logging.getLogger("unicom.embed.embed")


# ----------------------------------------------------------------------------- tar reading


# ----------------------------------------------------------------------------- decoding


@dataclass
class DecodedSample:
    """A sample after decoding: ``image`` is None exactly when ``error`` says why."""

    key: str
    caption: str
    url: str | None
    image: torch.Tensor | None
    error: str | None = None


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def decode_sample(
    sample: TarSample, transform: Callable[[Image.Image], torch.Tensor]
) -> DecodedSample:
    """Decode caption, URL and image of one sample; a failure is recorded, never raised."""
    meta: dict[str, Any] = {}
    if "json" in sample.files:
        try:
            meta = json.loads(sample.files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    caption = _text(sample.files.get("txt"))
    if caption is None:
        caption = str(meta.get(formats.CAPTION_COLUMN) or "")
    url = meta.get(formats.URL_COLUMN)
    url = None if url is None else str(url)

    image_member = sample_image(sample)
    if image_member is None:
        return DecodedSample(sample.key, caption, url, None, "no image member")
    extension, data = image_member
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            tensor = transform(image)
    except Exception as err:  # PIL raises many types for corrupt data; all mean "skip it"
        reason = str(err).splitlines()[0] if str(err) else ""
        return DecodedSample(
            sample.key,
            caption,
            url,
            None,
            f"undecodable {extension}: {type(err).__name__}: {reason}",
        )
    return DecodedSample(sample.key, caption, url, tensor)


@dataclass
class Batch:
    """Decoded samples ready for the encoders, plus those that were dropped."""

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    urls: list[str | None] = field(default_factory=list)
    images: torch.Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def pin_memory(self) -> Batch:
        # Called by the DataLoader (pin_memory=True) so host->GPU copies can be asynchronous.
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate_samples(samples: list[DecodedSample]) -> Batch:
    """Stack the decodable samples; list the others as (key, reason)."""
    batch = Batch()
    images = []
    for sample in samples:
        if sample.image is None:
            batch.skipped.append((sample.key, sample.error or "unknown"))
            continue
        batch.keys.append(sample.key)
        batch.captions.append(sample.caption)
        batch.urls.append(sample.url)
        images.append(sample.image)
    if images:
        batch.images = torch.stack(images)
    return batch


class ShardDataset(IterableDataset):
    """Yields lists of ``batch_size`` decoded samples, in shard order.

    With several workers, worker w takes batches w, w + n, w + 2n...; the DataLoader
    collects from workers in turn, so batches arrive in shard order.
    """

    def __init__(
        self,
        shard: str | os.PathLike,
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
    ):
        super().__init__()
        self.shard = str(shard)
        self.transform = transform
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[DecodedSample]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        chunk: list[TarSample] = []
        index = 0
        for sample in iter_samples(self.shard):
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                if index % workers == worker:
                    yield [decode_sample(s, self.transform) for s in chunk]
                chunk, index = [], index + 1
        if chunk and index % workers == worker:
            yield [decode_sample(s, self.transform) for s in chunk]


def shard_batches(
    shard: str | os.PathLike,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Batches of one shard, decoded by ``num_workers`` background processes."""
    loader = DataLoader(
        ShardDataset(shard, transform, batch_size),
        batch_size=None,  # the dataset yields whole batches already
        collate_fn=collate_samples,
        num_workers=num_workers,
        worker_init_fn=decoding_worker if num_workers else None,
        pin_memory=pin_memory,
    )
    yield from iterate(loader)


# ----------------------------------------------------------------------------- embedding


def embed_batches(
    batches: Iterable[Batch], encoder: Encoder, progress: tqdm | None = None
) -> EmbedResult:
    """Run the encoders over ``batches``; rows keep the order of the batches."""
    keys: list[str] = []
    captions: list[str] = []
    urls: list[str | None] = []
    image_parts: list[np.ndarray] = []
    text_parts: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for batch in batches:
        skipped.extend(batch.skipped)
        if batch.keys:
            image_parts.append(encoder.encode_images(batch.images).numpy().astype(np.float16))
            text_parts.append(encoder.encode_texts(batch.captions).numpy().astype(np.float16))
            keys.extend(batch.keys)
            captions.extend(batch.captions)
            urls.extend(batch.urls)
        if progress is not None:
            progress.update(len(batch.keys) + len(batch.skipped))
    return EmbedResult(
        keys=keys,
        captions=captions,
        urls=urls,
        image_emb=_stack(image_parts, encoder.image_dim),
        text_emb=_stack(text_parts, encoder.text_dim),
        skipped=skipped,
    )


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float16)


def embed_shard(
    shard: str | os.PathLike,
    encoder: Encoder,
    batch_size: int,
    num_workers: int,
    show_progress: bool = True,
) -> EmbedResult:
    """Embed every decodable sample of ``shard`` with an already built ``encoder``."""
    if not Path(shard).is_file():
        raise UnicomError(f"shard {shard} does not exist")
    total = scan_tar_samples(shard)
    batches = shard_batches(
        shard,
        encoder.image_transform,
        batch_size,
        num_workers,
        pin_memory=encoder.device.type == "cuda",
    )
    with tqdm(
        total=total, unit="img", desc=f"embed {Path(shard).name}", disable=not show_progress
    ) as progress:
        return embed_batches(batches, encoder, progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.embed.embed", description=__doc__)
    parser.add_argument(
        "--shard", nargs="+", required=True, help="webdataset tars written by img2dataset"
    )
    parser.add_argument("--out", nargs="+", required=True, help="output Parquet per shard")
    parser.add_argument(
        "--skipped", required=True, help="CSV of the samples skipped in any shard (key, reason)"
    )
    parser.add_argument("--options-json", required=True, help="the embed config section as JSON")
    parser.add_argument("--threads", type=int, help="torch CPU threads (the job's cores)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    setup_logging()
    check_pairs("--shard", args.shard, "--out", args.out)
    # The Rust tokenizer's own thread pool would compete with torch for the same cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    options = section_options("embed", parse_options_json(args.options_json))
    for shard in args.shard:  # before spending seconds on loading models
        if not Path(shard).is_file():
            raise UnicomError(f"shard {shard} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(options["device"], "embed.device")
    encoder = build_encoder(options, device)  # once for all the job's shards
    log.info("encoder %s on %s, %d threads", options["encoder"], device, torch.get_num_threads())

    skipped: list[tuple[str, str]] = []  # keys name their shard
    for shard, out in zip(args.shard, args.out, strict=True):
        fail_once_if_marked("embed", Path(shard).stem)  # rerun tests only
        start = time.perf_counter()
        result = embed_shard(
            shard, encoder, options["batch_size"], options["num_workers"], not args.no_progress
        )
        seconds = time.perf_counter() - start
        skipped += result.skipped
        write_parquet(out, result_table(result, encoder.identity))
        log.info(
            "%s: embedded %d images, skipped %d, in %.1f s (%.1f img/s) -> %s",
            shard,
            result.rows,
            len(result.skipped),
            seconds,
            result.rows / seconds if seconds > 0 else float("nan"),
            out,
        )
    write_skipped_csv(args.skipped, skipped)


if __name__ == "__main__":
    run_cli(main)
