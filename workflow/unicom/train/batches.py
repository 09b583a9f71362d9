"""The DataLoader of training: endless micro-batches of one rank, in the planned order whatever
the number of workers (see unicom.train.inputs for the scheme)."""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unicom.config import decode_conflict
from unicom.decoding import PendingImages, decode_rgb, jpeg_header
from unicom.errors import UnicomError
from unicom.train.augment import TrainTransform
from unicom.train.inputs import ShardLabels
from unicom.train.streams import (
    Sample,
    ShardImages,
    StreamPlan,
    batches_before,
    largest_divisor_at_most,
    stream_samples,
)
from unicom.workers import iterate, training_worker

log = logging.getLogger("unicom.train.batches")


def decode(
    sample: Sample, transform: TrainTransform, shard_path: str, path: str = "pil"
) -> torch.Tensor | tuple[bytes, tuple[int, ...]]:
    """One sample's crop, uint8 (3, S, S), by ``path`` (unicom.decoding); for ``cuda``, a plain
    JPEG comes back as its bytes and crop (top, left, height, width, flip), decoded later."""
    try:
        if path == "pil":
            with Image.open(io.BytesIO(sample.image)) as image:
                image.load()
                return transform(image, sample.rng)
        header = jpeg_header(sample.image) if path == "cuda" else None
        if header is not None:
            box, flip = transform.draw(*header, sample.rng)
            return sample.image, (*box, int(flip))
        return transform.crop_tensor(decode_rgb(sample.image), sample.rng)
    except Exception as err:  # PIL and torchvision raise many types for corrupt data
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnicomError(
            f"{shard_path}: cannot decode the image of {sample.key!r} ({reason})"
        ) from None


class TrainBatches(IterableDataset):
    """Endless micro-batches ``start_batch, start_batch + 1, ...`` of one rank (see module doc).

    Each item: ``images (B, 3, S, S)`` uint8 (with ``decode`` cuda, a ``PendingImages`` that
    the trainer finishes on the GPU), ``labels (B,)``, ``batch_index`` and ``shard_reads``
    (counts of the shards read since the previous item: (index, tar samples, unlabelled)).
    """

    def __init__(
        self,
        shards: Sequence[ShardLabels],
        transform: TrainTransform,
        batch_size: int,
        streams: int,
        seed: int,
        rank: int,
        start_batch: int = 0,
        shuffle_shards: int = 1,
        decode: str = "pil",
    ):
        super().__init__()
        conflict = decode_conflict(decode, dataclasses.asdict(transform))
        if conflict:
            raise UnicomError(conflict)
        self.shards = list(shards)
        self.transform = transform
        self.decode = decode
        self.batch_size = batch_size
        self.streams = streams
        self.seed = seed
        self.start_batch = start_batch
        sizes = tuple(len(shard) for shard in self.shards)
        self.plan = StreamPlan(sizes, seed, rank, streams, shuffle_shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.streams % workers:
            raise UnicomError(f"{workers} loader workers do not divide {self.streams} streams")
        reads: list[tuple[int, int, int]] = []

        def on_read(shard: ShardLabels, images: ShardImages) -> None:
            reads.append((shard.index, images.tar_samples, images.unlabelled))

        iterators: dict[int, Iterator[Sample]] = {}
        paths = {s.index: s.shard for s in self.shards}
        batch = self.start_batch + worker
        while True:
            stream = batch % self.streams
            if stream not in iterators:
                skip = batches_before(batch, stream, self.streams) * self.batch_size
                iterators[stream] = stream_samples(self.shards, self.plan, stream, skip, on_read)
            samples = [next(iterators[stream]) for _ in range(self.batch_size)]
            crops = [decode(s, self.transform, paths[s.shard], self.decode) for s in samples]
            if self.decode == "cuda":
                names = [f"the image of {s.key!r} in {paths[s.shard]}" for s in samples]
                images = PendingImages.pack(self.transform.size, crops, names)
            else:
                images = torch.stack(crops)  # type: ignore[arg-type]
            yield {
                "images": images,
                "labels": torch.tensor([s.label for s in samples], dtype=torch.long),
                "batch_index": batch,
                "shard_reads": reads.copy(),
            }
            reads.clear()
            batch += workers


def make_loader(
    dataset: TrainBatches, num_workers: int, pin_memory: bool = False
) -> Iterator[dict[str, Any]]:
    """The dataset's batches, decoded by ``num_workers`` processes (which divide the streams)."""
    workers = largest_divisor_at_most(dataset.streams, num_workers) if num_workers else 0
    if workers != num_workers:
        log.info(
            "using %d loader workers (they must divide the %d data streams)",
            workers,
            dataset.streams,
        )
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=training_worker if workers else None,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        # The loader draws its workers' base seed from this generator, not from the global
        # one, which must advance exactly as in an uninterrupted run (dropout draws from it).
        generator=torch.Generator().manual_seed(dataset.seed),
    )
    yield from iterate(loader)
