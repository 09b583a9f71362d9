"""Training data: webdataset shards joined with their pseudo-labels, streamed reproducibly.

Inputs are pairs ``shards/{part}.tar`` + ``assign/{part}.parquet`` (columns ``key``, ``label``,
``sim``, ``sim2``). A shard sample is kept when its key has a label (and, optionally, the label
is not ambiguous: ``sim - sim2 >= min_label_margin``); the others are counted.

Split and order (every choice is a function of the seed, so a resumed run sees the same data):

- shards go to ranks once, balanced by their number of labels (greedy, largest first);
- each rank's data is ``streams`` virtual streams. In epoch ``e`` of a stream, the rank's shards
  are shuffled (seed, rank, e) and stream ``v`` takes every ``streams``-th of them, in blocks of
  ``shuffle_shards``; it reads the shards of a block in one sequential pass each and yields
  their labelled samples shuffled together (shards are often far from random: the demo's are
  sorted by category). A stream never ends: after its last block it starts its next epoch;
- micro-batch ``b`` of a rank is ``batch_size`` consecutive samples of stream ``b % streams``;
  DataLoader worker ``w`` of ``W`` (``W`` divides ``streams``) builds batches ``b0 + w + kW``,
  so the batch sequence does not depend on the number of workers;
- augmentation of a sample draws from its own generator (seed, epoch, shard, row).

Resuming at micro-batch ``b0`` computes where each stream stands from the label counts alone:
skipped blocks are not read. Memory: each stream holds the image bytes of one block.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from unicom import distributed, formats
from unicom.errors import UnicomError
from unicom.images import to_rgb
from unicom.shards import iter_samples, sample_image
from unicom.workers import iterate, training_worker

log = logging.getLogger("unicom.train_data")

ASSIGNMENT_COLUMNS = ("key", "label")
MARGIN_COLUMNS = ("sim", "sim2")


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ShardInput:
    index: int  # position in the input list: names the shard in seeds and in data.json
    shard: str
    assignment: str

    @property
    def name(self) -> str:
        return Path(self.shard).name.removesuffix(".tar")


def pair_inputs(shards: Sequence[str], assignments: Sequence[str]) -> list[ShardInput]:
    """Shard ``i`` goes with assignment file ``i``; their names (``{part}``) must agree."""
    if not shards:
        raise UnicomError("no shards given (--shards)")
    if len(shards) != len(assignments):
        raise UnicomError(
            f"{len(shards)} shards but {len(assignments)} assignment files; give one per shard"
        )
    pairs, seen = [], set()
    for index, (shard, assignment) in enumerate(zip(shards, assignments, strict=True)):
        shard_part = Path(shard).name.removesuffix(".tar")
        assign_part = Path(assignment).name.removesuffix(".parquet")
        if shard_part != assign_part:
            raise UnicomError(
                f"assignment file {assignment} is paired with shard {shard}: list them in the "
                "same order (part names differ)"
            )
        if shard_part in seen:
            raise UnicomError(f"shard {shard_part} is given twice")
        seen.add(shard_part)
        pairs.append(ShardInput(index, str(shard), str(assignment)))
    return pairs


def inspect_assignment(path: str, num_classes: int) -> int:
    """Checks from the Parquet footer alone (columns, k, label statistics); returns the rows."""
    try:
        metadata = pq.read_metadata(path)
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise UnicomError(f"{path}: not a readable assignment Parquet ({err})") from None
    missing = [c for c in ASSIGNMENT_COLUMNS if c not in schema.names]
    if missing:
        raise UnicomError(f"{path}: missing column(s) {', '.join(missing)} (not an assign output?)")
    identity = formats.read_metadata(path, formats.ASSIGN_METADATA_KEY)
    if isinstance(identity, dict) and identity.get("k") not in (None, num_classes):
        raise UnicomError(
            f"{path}: labels come from k={identity['k']} centroids, but training expects "
            f"{num_classes} classes (kmeans.k); rerun assign or fix --num-classes"
        )
    column = schema.names.index("label")
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(column).statistics
        if stats is not None and stats.has_min_max:
            if stats.min < 0 or stats.max >= num_classes:
                bad = stats.min if stats.min < 0 else stats.max
                raise UnicomError(
                    f"{path}: label {bad} is outside [0, {num_classes}) (kmeans.k = {num_classes})"
                )
    return metadata.num_rows


def check_centroids(path: str, num_classes: int) -> None:
    """The number of centroids (``kmeans/centroids.npy``) must be the number of classes."""
    try:
        centroids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UnicomError(f"{path}: not a centroids .npy file ({err})") from None
    if centroids.ndim != 2 or centroids.shape[0] != num_classes:
        raise UnicomError(
            f"{path} holds {centroids.shape[0] if centroids.ndim else 0} centroids, but "
            f"--num-classes is {num_classes}; they must match (kmeans.k)"
        )


def partition_shards(rows: Sequence[int], world: int) -> list[list[int]]:
    """Shard indices of each rank, balanced by rows: largest first, onto the lightest rank."""
    if len(rows) < world:
        raise UnicomError(
            f"{len(rows)} shards for {world} ranks: every rank needs at least one shard "
            "(use fewer processes or smaller shards)"
        )
    load = [0] * world
    ranks: list[list[int]] = [[] for _ in range(world)]
    for index in sorted(range(len(rows)), key=lambda i: (-rows[i], i)):
        rank = min(range(world), key=lambda r: (load[r], len(ranks[r]), r))
        ranks[rank].append(index)
        load[rank] += rows[index]
    return [sorted(indices) for indices in ranks]


@dataclass
class ShardLabels:
    """The kept samples of one shard: ``keys[i]`` has ``labels[i]``."""

    index: int
    shard: str
    assignment: str
    keys: pa.Array
    labels: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.labels)


def read_shard_labels(
    item: ShardInput, num_classes: int, min_label_margin: float | None = None
) -> tuple[ShardLabels, dict[str, int]]:
    """Labels of one shard, checked; returns them and the counts (assigned, ambiguous)."""
    columns = list(ASSIGNMENT_COLUMNS) + (list(MARGIN_COLUMNS) if min_label_margin else [])
    try:
        table = pq.read_table(item.assignment, columns=columns)
    except (OSError, pa.ArrowInvalid) as err:
        raise UnicomError(f"{item.assignment}: cannot read columns {columns} ({err})") from None
    keys = table["key"].combine_chunks().cast(pa.string())
    labels = table["label"].to_numpy().astype(np.int64)
    if keys.null_count:
        raise UnicomError(f"{item.assignment}: {keys.null_count} rows have no key")
    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range)[0])
        raise UnicomError(
            f"{item.assignment}: label {labels[row]} of key {keys[row].as_py()!r} is outside "
            f"[0, {num_classes}) (kmeans.k = {num_classes})"
        )
    if pc.count_distinct(keys).as_py() != len(keys):
        raise UnicomError(f"{item.assignment}: a key appears twice")
    counts = {"assigned": len(labels), "ambiguous": 0}
    if min_label_margin:
        margin = table["sim"].to_numpy() - table["sim2"].to_numpy()
        keep = margin >= min_label_margin
        counts["ambiguous"] = int((~keep).sum())
        keys, labels = keys.filter(pa.array(keep)), labels[keep]
    return ShardLabels(item.index, item.shard, item.assignment, keys, labels.astype(np.int32)), (
        counts
    )


# ----------------------------------------------------------------------------- order


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


# Distinct first keys, so that no two kinds of draw share a seed sequence.
_SHARD_ORDER, _SAMPLE_ORDER, _AUGMENT = 101, 102, 103


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


# ----------------------------------------------------------------------------- augmentation


def crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A random crop (top, left, height, width) covering ``scale`` of the area with aspect
    ratio in ``ratio`` (log-uniform); after ``attempts`` misses, the largest central crop
    whose ratio is in range."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target * aspect))
        crop_h = round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    aspect = width / height
    crop_w, crop_h = width, height
    if aspect < ratio[0]:
        crop_h = round(width / ratio[0])
    elif aspect > ratio[1]:
        crop_w = round(height * ratio[1])
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


@dataclass(frozen=True)
class TrainTransform:
    """Random resized crop, horizontal flip, optional colour jitter -> uint8 (3, size, size).

    Normalisation happens on the training device: uint8 batches are a quarter of the bytes
    to pass from the workers and to copy to the GPU.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        image = to_rgb(image)
        top, left, height, width = crop_box(image.width, image.height, self.scale, self.ratio, rng)
        image = TF.resized_crop(
            image,
            top,
            left,
            height,
            width,
            [self.size, self.size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        if rng.random() < self.hflip:
            image = TF.hflip(image)
        if self.color_jitter > 0:
            low, high = max(0.0, 1 - self.color_jitter), 1 + self.color_jitter
            image = TF.adjust_brightness(image, rng.uniform(low, high))
            image = TF.adjust_contrast(image, rng.uniform(low, high))
            image = TF.adjust_saturation(image, rng.uniform(low, high))
        return TF.pil_to_tensor(image)


# ----------------------------------------------------------------------------- reading


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
    label: int
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
                    int(shard.labels[shard_row]),
                    shard.keys[shard_row].as_py(),
                    shard.index,
                    augment_rng(plan.seed, epoch, shard.index, shard_row),
                )
            offset = 0
        position = 0
        epoch += 1


def decode(sample: Sample, transform: TrainTransform, shard_path: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(sample.image)) as image:
            image.load()
            return transform(image, sample.rng)
    except Exception as err:  # PIL raises many types for corrupt data
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnicomError(
            f"{shard_path}: cannot decode the image of {sample.key!r} ({reason})"
        ) from None


class TrainBatches(IterableDataset):
    """Endless micro-batches ``start_batch, start_batch + 1, ...`` of one rank (see module doc).

    Each item: ``images (B, 3, S, S)`` uint8, ``labels (B,)``, ``batch_index`` and ``shard_reads``
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
    ):
        super().__init__()
        self.shards = list(shards)
        self.transform = transform
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
            images = torch.stack([decode(s, self.transform, paths[s.shard]) for s in samples])
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


# ----------------------------------------------------------------------------- per rank


@dataclass
class RankData:
    """What one rank trains on, and the accounting of every input sample."""

    inputs: list[ShardInput]
    shards: list[ShardLabels]  # this rank's
    streams: int
    total_samples: int  # kept samples of all ranks (one epoch)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # shard name -> counts

    def signature(self) -> list[list[Any]]:
        """Identifies the data for the checkpoint check: each shard's name and kept count."""
        kept = {name: c["kept"] for name, c in self.counts.items()}
        return [[item.name, kept[item.name]] for item in self.inputs]


def prepare_rank_data(
    inputs: Sequence[ShardInput],
    num_classes: int,
    rank: int,
    world: int,
    streams: int,
    min_label_margin: float | None = None,
) -> RankData:
    """Check every input, split the shards over the ranks and read this rank's labels.

    Collective: call it on every rank; an error on any rank is raised on all of them.
    """
    inputs = list(inputs)
    rows = distributed.from_rank_zero(
        lambda: [inspect_assignment(item.assignment, num_classes) for item in inputs]
    )
    mine = partition_shards(rows, world)[rank]

    def read_mine() -> tuple[list[ShardLabels], dict[str, dict[str, int]]]:
        shards, counts = [], {}
        for index in mine:
            item = inputs[index]
            if not os.path.isfile(item.shard):
                raise UnicomError(f"shard {item.shard} does not exist")
            labels, count = read_shard_labels(item, num_classes, min_label_margin)
            shards.append(labels)
            counts[item.name] = {**count, "kept": len(labels), "rank": rank}
        return shards, counts

    shards, counts = distributed.on_every_rank(read_mine)
    all_counts: dict[str, dict[str, int]] = {}
    for part in distributed.all_gather_objects(counts):
        all_counts.update(part)
    per_rank_nonempty = [0] * world
    for count in all_counts.values():
        per_rank_nonempty[count["rank"]] += int(count["kept"] > 0)
    if min(per_rank_nonempty) == 0:
        raise UnicomError(
            "a rank has no labelled samples (its shards are empty after the joins/filters); "
            "use fewer processes"
        )
    used_streams = min(streams, min(per_rank_nonempty))
    if used_streams != streams:
        log.info("%d data streams per rank (a rank has only that many shards)", used_streams)
    total = sum(c["kept"] for c in all_counts.values())
    return RankData(
        inputs=inputs,
        shards=[s for s in shards if len(s)],
        streams=used_streams,
        total_samples=total,
        counts=all_counts,
    )


# ----------------------------------------------------------------------------- synthetic data


def write_synthetic_shard(
    shard_path: str | os.PathLike,
    assignment_path: str | os.PathLike,
    part: str,
    samples: int,
    num_classes: int,
    size: int = 32,
    unlabelled: int = 0,
    seed: int = 0,
) -> None:
    """A small real shard + assignment pair (tests, benchmark): JPEGs whose colour and
    stripe orientation depend on the label, so a model can learn them; the last
    ``unlabelled`` samples of the tar get no assignment row."""
    import tarfile

    from PIL import ImageDraw

    from unicom.io import atomic_path, write_parquet

    rng = np.random.default_rng([seed, int(part)])
    keys, labels = [], []
    with atomic_path(shard_path) as tmp, tarfile.open(tmp, "w") as archive:
        for i in range(samples + unlabelled):
            key = formats.global_key(part, f"{i:09d}")
            label = int(rng.integers(num_classes))
            hue = np.array([(97 * label) % 256, (57 * label + 80) % 256, (31 * label + 160) % 256])
            colour = np.clip(hue + rng.integers(-25, 25, 3), 0, 255)
            image = Image.new("RGB", (size, size), tuple(int(v) for v in colour))
            draw = ImageDraw.Draw(image)
            step = max(2, size // (2 + label % 4))
            for offset in range(0, 2 * size, step):
                line = [(offset, 0), (0, offset)] if label % 2 else [(offset, 0), (offset, size)]
                draw.line(line, fill=(255, 255, 255), width=max(1, size // 16))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            members = {
                "jpg": buffer.getvalue(),
                "txt": f"synthetic sample {i} of class {label}".encode(),
                "json": json.dumps({"key": key, "caption": f"class {label}"}).encode(),
            }
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            if i < samples:
                keys.append(key)
                labels.append(label)
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "label": pa.array(labels, pa.int32()),
            "sim": pa.array(rng.uniform(0.6, 0.9, len(keys)), pa.float32()),
            "sim2": pa.array(rng.uniform(0.3, 0.6, len(keys)), pa.float32()),
        }
    )
    metadata = {formats.ASSIGN_METADATA_KEY: {"k": num_classes, "synthetic": True}}
    write_parquet(assignment_path, formats.with_metadata(table, metadata))
