"""The order of the data, a pure function of the seed and the position: per-epoch shard shuffles,
the blocks each stream reads, and where a stream stands after any number of samples (so a
resumed run skips the blocks before it without reading them); then the endless sample
sequence of one stream, read from the tars a block at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from unicom.errors import UnicomError
from unicom.shards import iter_samples, sample_image
from unicom.train.inputs import ShardLabels

# Distinct first keys, so that no two kinds of draw share a seed sequence.
_SHARD_ORDER, _SAMPLE_ORDER, _AUGMENT = 101, 102, 103


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def epoch_shard_order(num_shards: int, seed: int, rank: int, epoch: int) -> np.ndarray:
    """Positions (in the rank's shard list) in the order epoch ``epoch`` visits them."""
    return _rng(_SHARD_ORDER, seed, rank, epoch).permutation(num_shards)


def augment_rng(seed: int, epoch: int, shard_index: int, row: int) -> np.random.Generator:
    return _rng(_AUGMENT, seed, epoch, shard_index, row)


@dataclass(frozen=True)
class StreamPlan:
    """How a rank's shards become the endless sample sequences of its streams.

    In epoch ``e`` of stream ``v``: the rank's shards in the epoch's shuffled order, every
    ``streams``-th from ``v`` on, cut into blocks of ``shuffle_shards`` consecutive shards;
    the samples of a block are read together and shuffled together.
    """

    sizes: tuple[int, ...]  # kept samples of each of the rank's shards
    seed: int
    rank: int
    streams: int
    shuffle_shards: int

    def blocks(self, stream: int, epoch: int) -> list[np.ndarray]:
        order = epoch_shard_order(len(self.sizes), self.seed, self.rank, epoch)
        shards, size = order[stream :: self.streams], self.shuffle_shards
        return [shards[i : i + size] for i in range(0, len(shards), size)]

    def block_size(self, block: np.ndarray) -> int:
        return sum(self.sizes[i] for i in block)

    def block_order(self, stream: int, epoch: int, position: int, size: int) -> np.ndarray:
        return _rng(_SAMPLE_ORDER, self.seed, self.rank, stream, epoch, position).permutation(size)

    def locate(self, stream: int, skip: int) -> tuple[int, int, int]:
        """Where a stream stands after ``skip`` samples: (epoch, block position in that
        epoch, offset in the block's sample order)."""
        epoch = 0
        while True:
            sizes = [self.block_size(block) for block in self.blocks(stream, epoch)]
            if sum(sizes) == 0:
                raise UnicomError(f"rank {self.rank}: data stream {stream} has no samples")
            for position, size in enumerate(sizes):
                if skip < size:
                    return epoch, position, skip
                skip -= size
            epoch += 1


def batches_before(start_batch: int, stream: int, streams: int) -> int:
    """Micro-batches ``b < start_batch`` that stream ``stream`` served (``b % streams``)."""
    return max(0, -(-(start_batch - stream) // streams))


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


@dataclass
class ShardImages:
    """Image bytes of a shard's kept samples, in ``ShardLabels`` row order, and counts."""

    images: list[bytes]
    tar_samples: int
    unlabelled: int


def read_shard_images(shard: ShardLabels) -> ShardImages:
    """One sequential pass over the tar; every kept key must be found with an image."""
    rows = {key: row for row, key in enumerate(shard.keys.to_pylist())}
    images: list[bytes | None] = [None] * len(rows)
    tar_samples = unlabelled = 0
    for sample in iter_samples(shard.shard):
        tar_samples += 1
        row = rows.get(sample.key)
        if row is None:
            unlabelled += 1
            continue
        image = sample_image(sample)
        if image is None:
            raise UnicomError(f"{shard.shard}: labelled sample {sample.key!r} has no image")
        images[row] = image[1]
    missing = [row for row, data in enumerate(images) if data is None]
    if missing:
        raise UnicomError(
            f"{shard.assignment}: key {shard.keys[missing[0]].as_py()!r} (and "
            f"{len(missing) - 1} more) is not in {shard.shard}; the assignment belongs to "
            "another shard (rerun embed/assign)"
        )
    return ShardImages(images, tar_samples, unlabelled)  # type: ignore[arg-type]


@dataclass
class Sample:
    image: bytes
    label: int | list[int]  # the label, or the row's positives (train.positives > 1)
    key: str
    shard: int
    rng: np.random.Generator


def stream_samples(
    shards: Sequence[ShardLabels],
    plan: StreamPlan,
    stream: int,
    skip: int,
    on_read: Callable[[ShardLabels, ShardImages], None] | None = None,
) -> Iterator[Sample]:
    """The endless sample sequence of one stream, from its ``skip``-th sample on."""
    epoch, position, offset = plan.locate(stream, skip)
    while True:
        for block_position, block in enumerate(plan.blocks(stream, epoch)):
            if block_position < position:
                continue
            members = [shards[i] for i in block]
            images: list[bytes] = []
            for shard in members:
                read = read_shard_images(shard)
                images.extend(read.images)
                if on_read is not None:
                    on_read(shard, read)
            # Row r of the block: shard owner[r], row local[r] of that shard.
            owner = np.repeat(np.arange(len(members)), [len(m) for m in members])
            local = np.concatenate([np.arange(len(m)) for m in members] or [np.zeros(0, int)])
            for row in plan.block_order(stream, epoch, block_position, len(images))[offset:]:
                shard, shard_row = members[owner[row]], int(local[row])
                yield Sample(
                    images[row],
                    shard.labels[shard_row].tolist(),
                    shard.keys[shard_row].as_py(),
                    shard.index,
                    augment_rng(plan.seed, epoch, shard.index, shard_row),
                )
            offset = 0
        position = 0
        epoch += 1
