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

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unicom import distributed, drops, formats
from unicom.errors import UnicomError

log = logging.getLogger("unicom.train.inputs")

ASSIGNMENT_COLUMNS = ("key", "label")
MARGIN_COLUMNS = ("sim", "sim2")


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
    labels: np.ndarray  # int32 (n,), or (n, positives) when train.positives > 1

    def __len__(self) -> int:
        return len(self.labels)


def read_positives(table: pa.Table, path: str, positives: int) -> np.ndarray:
    """(n,) labels for ``positives`` 1, else (n, positives): the nearest ``labels`` first."""
    if positives == 1:
        return table["label"].to_numpy().astype(np.int64)
    column = table["labels"].combine_chunks()
    width = column.type.list_size if pa.types.is_fixed_size_list(column.type) else 0
    if width < positives:
        raise UnicomError(
            f"{path}: holds the nearest {width} centroids per row, but train.positives is "
            f"{positives} (raise assign.top_labels and rerun assign)"
        )
    return column.flatten().to_numpy().astype(np.int64).reshape(-1, width)[:, :positives]


def read_shard_labels(
    item: ShardInput,
    num_classes: int,
    min_label_margin: float | None = None,
    positives: int = 1,
    skip: dict[str, str] | None = None,
) -> tuple[ShardLabels, dict[str, int]]:
    """Labels of one shard, checked; returns them and the counts (assigned, ambiguous, and
    per reason the rows ``skip`` (key -> hygiene reason) leaves out)."""
    columns = list(ASSIGNMENT_COLUMNS) + (list(MARGIN_COLUMNS) if min_label_margin else [])
    columns += ["labels"] if positives > 1 else []
    try:
        table = pq.read_table(item.assignment, columns=columns)
    except (OSError, pa.ArrowInvalid, KeyError) as err:
        raise UnicomError(f"{item.assignment}: cannot read columns {columns} ({err})") from None
    keys = table["key"].combine_chunks().cast(pa.string())
    labels = read_positives(table, item.assignment, positives)
    if keys.null_count:
        raise UnicomError(f"{item.assignment}: {keys.null_count} rows have no key")
    out_of_range = ((labels < 0) | (labels >= num_classes)).reshape(len(labels), -1)
    if out_of_range.any():
        row, column = (int(i[0]) for i in np.nonzero(out_of_range))
        raise UnicomError(
            f"{item.assignment}: label {labels.reshape(len(labels), -1)[row, column]} of key "
            f"{keys[row].as_py()!r} is outside "
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
    counts.update({reason: 0 for reason in drops.REASONS})
    if skip:
        reasons = [skip.get(key) for key in keys.to_pylist()]
        for reason in reasons:
            if reason is not None:
                counts[reason] += 1
        keep = np.array([reason is None for reason in reasons], bool)
        keys, labels = keys.filter(pa.array(keep)), labels[keep]
    return ShardLabels(item.index, item.shard, item.assignment, keys, labels.astype(np.int32)), (
        counts
    )


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
    positives: int = 1,
    skip_files: Sequence[str] = (),
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
        # This rank's shards' drops only: the drops files are sorted by part.
        skipped = drops.read(skip_files, [inputs[i].name for i in mine]) if skip_files else None
        skip = drops.reasons_by_key(skipped) if skipped is not None else None
        for index in mine:
            item = inputs[index]
            if not os.path.isfile(item.shard):
                raise UnicomError(f"shard {item.shard} does not exist")
            labels, count = read_shard_labels(item, num_classes, min_label_margin, positives, skip)
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
