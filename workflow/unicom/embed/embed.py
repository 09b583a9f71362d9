"""Embed webdataset shards: image and caption embeddings per sample -> one Parquet per shard.

Each shard (a tar written by img2dataset) is streamed; DataLoader workers decode and
transform images (``embed.decode``: PIL, torchvision.io, or only the JPEG bytes for the GPU
to decode) while the main process runs both encoders on each batch, loaded once for all the
shards of the job. One loader reads the job's shards in turn, so that its workers never
restart between shards; the host never waits for the GPU except where a finished shard's
embeddings are collected, on the writer thread that writes its Parquet
(``unicom.embed.results``). Samples whose image cannot be decoded are skipped and listed, with
the reason, in one CSV for the job.

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
import functools
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from unicom import formats
from unicom.cli import check_pairs, run_cli, setup_logging
from unicom.decoding import SQUARE, PendingImages, decode_rgb, jpeg_header, square
from unicom.devices import resolve_device
from unicom.embed.outputs import EmbedResult, result_table, write_skipped_csv
from unicom.embed.results import ShardEmbeddings, ShardWriter
from unicom.encoders import build_encoder
from unicom.encoders.base import Encoder
from unicom.errors import UnicomError
from unicom.faults import fail_once_if_marked
from unicom.options import StageOptions
from unicom.shards import TarSample, iter_samples, sample_image, scan_tar_samples
from unicom.workers import decoding_worker, iterate

__all__ = ["EmbedResult", "result_table", "write_skipped_csv"]  # re-exported

log = logging.getLogger("unicom.embed.embed")
OPTIONS = StageOptions("embed")

Transform = Callable[[Image.Image], torch.Tensor]


# ----------------------------------------------------------------------------- decoding


@dataclass
class DecodedSample:
    """A sample after decoding: ``image`` is None exactly when ``error`` says why; with
    embed.decode cuda a plain JPEG's image is its (bytes, crop), decoded on the GPU."""

    key: str
    caption: str
    url: str | None
    image: torch.Tensor | tuple[bytes, tuple[int, ...]] | None
    error: str | None = None


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _decode_image(data: bytes, transform: Transform, decode: str, size: int):
    if decode == "pil":
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return transform(image)
    if decode == "cuda" and jpeg_header(data) is not None:
        return data, SQUARE
    return square(decode_rgb(data), size)


def decode_sample(
    sample: TarSample, transform: Transform, decode: str = "pil", size: int = 0
) -> DecodedSample:
    """Decode caption, URL and image of one sample; a failure is recorded, never raised.
    ``decode`` (unicom.decoding): pil runs ``transform``, the others the centred ``size``
    square of the encoder (its ``square_size``)."""
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
        image = _decode_image(data, transform, decode, size)
    except Exception as err:  # PIL raises many types for corrupt data; all mean "skip it"
        return DecodedSample(sample.key, caption, url, None, undecodable(extension, err))
    return DecodedSample(sample.key, caption, url, image)


def undecodable(extension: str, err: BaseException | str) -> str:
    if isinstance(err, str):
        return f"undecodable {extension}: {err}"
    reason = str(err).splitlines()[0] if str(err) else ""
    return f"undecodable {extension}: {type(err).__name__}: {reason}"


@dataclass
class Batch:
    """Decoded samples ready for the encoders, plus those that were dropped; ``shard``: its
    position among the shards of the job."""

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    urls: list[str | None] = field(default_factory=list)
    images: torch.Tensor | PendingImages | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    shard: int = 0

    def pin_memory(self) -> Batch:
        # Called by the DataLoader (pin_memory=True) so host->GPU copies can be asynchronous.
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate_samples(samples: list[DecodedSample], size: int = 0) -> Batch:
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
    if images and any(not torch.is_tensor(image) for image in images):
        batch.images = PendingImages.pack(size, images, batch.keys)
    elif images:
        batch.images = torch.stack(images)
    return batch


def _collate_item(item: tuple[int, list[DecodedSample]], size: int) -> Batch:
    shard, samples = item
    batch = collate_samples(samples, size)
    batch.shard = shard
    return batch


class ShardDataset(IterableDataset):
    """Yields (shard position, ``batch_size`` decoded samples), shard after shard, each shard's
    samples in order; an empty shard yields one empty list, so that every shard shows up.

    With several workers, worker w takes batches w, w + n, w + 2n... (counted over all the
    shards); the DataLoader collects from workers in turn, so batches arrive in order.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        transform: Transform,
        batch_size: int,
        decode: str = "pil",
        size: int = 0,
    ):
        super().__init__()
        single = isinstance(shards, (str, os.PathLike))
        self.shards = [str(shards)] if single else [str(s) for s in shards]
        self.transform = transform
        self.batch_size = batch_size
        self.decode, self.size = decode, size

    def _decoded(self, chunk: list[TarSample]) -> list[DecodedSample]:
        return [decode_sample(s, self.transform, self.decode, self.size) for s in chunk]

    def __iter__(self) -> Iterator[tuple[int, list[DecodedSample]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = 0
        for position, shard in enumerate(self.shards):
            chunk: list[TarSample] = []
            first = index
            for sample in iter_samples(shard):
                chunk.append(sample)
                if len(chunk) == self.batch_size:
                    if index % workers == worker:
                        yield position, self._decoded(chunk)
                    chunk, index = [], index + 1
            if (chunk or index == first) and index % workers == worker:
                yield position, self._decoded(chunk)
            index += 1 if chunk or index == first else 0


def shard_batches(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    transform: Transform,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
    decode: str = "pil",
    size: int = 0,
) -> Iterator[Batch]:
    """Batches of one shard or of several in turn, decoded by ``num_workers`` processes."""
    loader = DataLoader(
        ShardDataset(shards, transform, batch_size, decode, size),
        batch_size=None,  # the dataset yields whole batches already
        collate_fn=functools.partial(_collate_item, size=size),
        num_workers=num_workers,
        worker_init_fn=decoding_worker if num_workers else None,
        pin_memory=pin_memory,
    )
    yield from iterate(loader)


# ----------------------------------------------------------------------------- embedding


def embed_batches(
    batches: Iterable[Batch], encoder: Encoder, progress: tqdm | None = None
) -> EmbedResult:
    """Run the encoders over ``batches`` (one shard); rows keep the order of the batches."""
    collected = ShardEmbeddings(encoder)
    for batch in batches:
        collected.add(batch)
        if progress is not None:
            progress.update(len(batch.keys) + len(batch.skipped))
    return collected.result()


def embed_shard(
    shard: str | os.PathLike,
    encoder: Encoder,
    batch_size: int,
    num_workers: int,
    show_progress: bool = True,
    decode: str = "pil",
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
        decode=decode,
        size=check_decode(decode, encoder),
    )
    with tqdm(
        total=total, unit="img", desc=f"embed {Path(shard).name}", disable=not show_progress
    ) as progress:
        return embed_batches(batches, encoder, progress)


def check_decode(decode: str, encoder: Encoder) -> int:
    """The square side the tensor paths resize to (0 for pil)."""
    if decode == "pil":
        return 0
    if encoder.square_size is None:
        raise UnicomError(
            f"config key embed.decode: {decode} does the shorter side + centred square, but "
            "this encoder's preprocessing is another; use pil"
        )
    return encoder.square_size


def embed_job(
    shards: Sequence[str],
    outs: Sequence[str],
    encoder: Encoder,
    options: dict[str, Any],
    show_progress: bool = True,
) -> list[tuple[str, str]]:
    """Embed and write every shard of the job; returns the skipped samples (keys name their
    shard). A shard is handed to the writer when the next one's first batch arrives."""
    totals = [scan_tar_samples(shard) for shard in shards]
    batches = shard_batches(
        shards,
        encoder.image_transform,
        options["batch_size"],
        options["num_workers"],
        pin_memory=encoder.device.type == "cuda",
        decode=options["decode"],
        size=check_decode(options["decode"], encoder),
    )
    writer = ShardWriter(encoder.identity)
    total = None if None in totals else sum(totals)  # type: ignore[arg-type]
    started, waited = time.perf_counter(), 0.0
    current: ShardEmbeddings | None = None
    position = -1
    try:
        with tqdm(total=total, unit="img", desc="embed", disable=not show_progress) as progress:
            while True:
                asked = time.perf_counter()
                batch = next(batches, None)
                if current is not None and (batch is None or batch.shard != position):
                    writer.submit(shards[position], outs[position], current)
                if batch is None:
                    break
                if batch.shard != position:
                    position = batch.shard
                    fail_once_if_marked("embed", Path(shards[position]).stem)  # rerun tests
                    current = ShardEmbeddings(encoder)
                current.waited += time.perf_counter() - asked
                waited += time.perf_counter() - asked
                current.add(batch)
                current.seconds += time.perf_counter() - asked
                progress.update(len(batch.keys) + len(batch.skipped))
    except BaseException:
        writer.pool.shutdown(wait=True)  # the shards before this one are written
        raise
    results = writer.close()
    seconds = time.perf_counter() - started
    rows = sum(result.rows for result in results)
    log.info(
        "job: %d images in %.1f s (%.1f img/s, %.0f%% of it waiting for data)",
        rows,
        seconds,
        rows / seconds,
        100 * waited / seconds,
    )
    return [skip for result in results for skip in result.skipped]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.embed.embed", description=__doc__)
    parser.add_argument(
        "--shard", nargs="+", required=True, help="webdataset tars written by img2dataset"
    )
    parser.add_argument("--out", nargs="+", required=True, help="output Parquet per shard")
    parser.add_argument(
        "--skipped", required=True, help="CSV of the samples skipped in any shard (key, reason)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (the job's cores)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    OPTIONS.add_to(parser)
    args = parser.parse_args(argv)
    options = OPTIONS.from_args(args)
    setup_logging()
    check_pairs("--shard", args.shard, "--out", args.out)
    # The Rust tokenizer's own thread pool would compete with torch for the same cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for shard in args.shard:  # before spending seconds on loading models
        if not Path(shard).is_file():
            raise UnicomError(f"shard {shard} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(options["device"], "embed.device")
    encoder = build_encoder(options, device)  # once for all the job's shards
    log.info("encoder %s on %s, %d threads", options["encoder"], device, torch.get_num_threads())

    if options["decode"] == "cuda" and device.type != "cuda":
        raise UnicomError("config key embed.decode: cuda decodes on the GPU, but there is none")
    skipped = embed_job(args.shard, args.out, encoder, options, not args.no_progress)
    write_skipped_csv(args.skipped, skipped)


if __name__ == "__main__":
    run_cli(main)
