"""Semantic near-duplicates (SemDeDup, Abbas et al. 2023) within each k-means cluster.

The clusters are the search partition: pairs are compared only inside a cluster, so the cost
is sum_c n_c^2 d instead of n^2 d. No job holds every vector: ``scatter`` (one job per batch of
shards) writes each row's vector to ``scatter/{batch}.parquet`` sorted by its cluster's group
(``label mod groups``), one row group per group; ``dedup`` (one job per group) reads its row
group from every scatter file, i.e. whole clusters, and writes the drops of its clusters.

Per cluster (``semdedup``): items ordered by cosine to the cluster's mean, least similar first
(SemDeDup's choice: keep the atypical member of a group); an item whose cosine to any item
before it exceeds ``threshold`` is ``near_duplicate`` (SemDeDup's own rule, which makes the
drops nested as the threshold falls); its twin is the kept item its chain of drops leads back
to, its similarity the cosine that dropped it; cosines clamped to [-1, 1]. Rows the screen already dropped take no part. The clusters stay as they are: a
near-duplicate leaves training only.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from unicom import drops, formats
from unicom.cli import run_cli, setup_logging
from unicom.config import section_options
from unicom.errors import UnicomError
from unicom.io import atomic_path, write_json
from unicom.options import StageOptions
from unicom.vectors import l2_normalize

log = logging.getLogger("unicom.hygiene.near")
# scatter needs only the space (a new threshold reuses its files); dedup the dedup section.
SCATTER_OPTIONS = StageOptions(fields={"space": "dedup.space"})
DEDUP_OPTIONS = StageOptions("dedup")

SPACE_COLUMNS = {"image": "image_emb", "fused": formats.EMBEDDING_COLUMN}
GROUPS_METADATA_KEY = b"unicom.near.groups"
# Items compared at once against the kept ones: bounds memory at BLOCK x n_c floats.
BLOCK = 1024


# ---------------------------------------------------------------------------------------------
# Pure core


def keep_order(vectors: np.ndarray, keys: Sequence[str]) -> np.ndarray:
    """Indices least similar to the cluster's (normalised) mean first; ties by key."""
    mean = l2_normalize(vectors.mean(axis=0, keepdims=True))[0]
    to_mean = vectors @ mean
    return np.lexsort((np.asarray(keys, dtype=object).astype(str), to_mean))


@functools.lru_cache(maxsize=4)
def not_before(size: int) -> np.ndarray:
    """size x size: 0 below the diagonal, -inf on and above it (added, one contiguous pass;
    cached, one per block size)."""
    return np.triu(np.full((size, size), -np.inf, np.float32))


def semdedup(
    vectors: np.ndarray, keys: Sequence[str], threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One cluster: (dropped mask, twin, trigger, similarity) per input row.

    SemDeDup's rule: in keep order, an item is dropped when its cosine to any item before it
    exceeds ``threshold`` (so lowering the threshold only ever drops more). ``trigger`` is that
    most similar earlier item and ``similarity`` the cosine to it; ``twin`` is the kept item
    the drop leads back to (the trigger, or the trigger's own twin when it was dropped too).
    -1 / 0 for kept rows. ``vectors`` are unit rows; a block of items at a time is compared
    with every earlier item (one matrix product), so memory is BLOCK x n floats.
    """
    n = len(vectors)
    dropped = np.zeros(n, bool)
    twin = np.full(n, -1, np.int64)
    trigger = np.full(n, -1, np.int64)
    similarity = np.zeros(n, np.float32)
    if n < 2:
        return dropped, twin, trigger, similarity
    order = keep_order(vectors, keys)
    x = vectors[order].astype(np.float32)
    for start in range(1, n, BLOCK):
        block = x[start : start + BLOCK]
        size = len(block)
        sims = block @ x[: start + size].T
        # Only items before each one count: the diagonal and above, in the block's own columns.
        sims[:, start:] += not_before(size)
        best = sims.argmax(axis=1)
        best_sim = np.clip(sims[np.arange(size), best], -1.0, 1.0)
        for j in np.flatnonzero(best_sim > threshold):
            item, earlier = order[start + j], order[best[j]]
            dropped[item], trigger[item], similarity[item] = True, earlier, best_sim[j]
            twin[item] = twin[earlier] if dropped[earlier] else earlier
    return dropped, twin, trigger, similarity


def runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values in a sorted array (clusters, groups)."""
    bounds = (np.flatnonzero(np.diff(values)) + 1).tolist()
    return [(a, b) for a, b in zip([0, *bounds], [*bounds, len(values)], strict=True) if b > a]


def flops(cluster_sizes: Sequence[int], dim: int) -> float:
    """Brute-force pairwise cost sum_c n_c^2 d (multiply-adds x 2)."""
    return float(2 * dim * sum(int(n) ** 2 for n in cluster_sizes))


# ---------------------------------------------------------------------------------------------
# scatter: one job per batch of shards


def read_space(path: str, column: str) -> tuple[pa.Array, np.ndarray]:
    try:
        table = pq.read_table(path, columns=["key", column])
    except (OSError, pa.ArrowInvalid, KeyError) as err:
        raise UnicomError(f"{path}: no readable '{column}' column ({err})") from None
    keys = table["key"].combine_chunks()
    return keys, l2_normalize(formats.column_to_numpy(table[column]).astype(np.float32))


def scatter(
    assignments: Sequence[str],
    spaces: Sequence[str],
    screened: str | None,
    out: str,
    options: Mapping[str, Any],
    groups: int,
) -> dict[str, Any]:
    """Write the batch's kept rows (key, part, label, vector) sorted by group, a row group each.
    ``options``: {"space": dedup.space} (nothing else, so a new threshold reuses the files)."""
    column = SPACE_COLUMNS[options["space"]]
    parts = [Path(a).name.removesuffix(".parquet") for a in assignments]
    skip = set(drops.read([screened], parts)["key"].to_pylist()) if screened else set()
    tables, skipped = [], 0
    for assignment, space in zip(assignments, spaces, strict=True):
        labels = pq.read_table(assignment, columns=["key", "label"])
        keys, vectors = read_space(space, column)
        where = pc.index_in(labels["key"], value_set=keys).to_numpy(zero_copy_only=False)
        if np.isnan(where.astype(float)).any():
            raise UnicomError(f"{space}: lacks keys that {assignment} assigns")
        where = where.astype(np.int64)
        kept = np.array([k not in skip for k in labels["key"].to_pylist()], bool)
        skipped += int((~kept).sum())
        label = labels["label"].to_numpy()[kept]
        tables.append(
            pa.table(
                {
                    "group": pa.array(label % groups, pa.int32()),
                    "label": pa.array(label, pa.int32()),
                    "key": labels["key"].filter(pa.array(kept)),
                    "part": pa.array([Path(assignment).stem] * int(kept.sum()), pa.string()),
                    "vector": formats.embedding_array(vectors[where[kept]]),
                }
            )
        )
    table = pa.concat_tables(tables).sort_by([("group", "ascending"), ("label", "ascending")])
    group_column = table["group"].to_numpy()
    slices = runs(group_column)
    # Which row group holds which group: a dedup job reads only its own.
    index = {int(group_column[start]): i for i, (start, _) in enumerate(slices)}
    table = table.replace_schema_metadata({GROUPS_METADATA_KEY: json.dumps(index).encode()})
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, table.schema) as writer:
        for start, end in slices:
            # exactly one row group per group, however large (the index above counts on it)
            writer.write_table(table.slice(start, end - start), row_group_size=end - start)
    return {"rows": len(table), "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# dedup: one job per group of clusters


def read_group(path: str, group: int) -> pa.Table | None:
    parquet = pq.ParquetFile(path)
    index = json.loads(parquet.schema_arrow.metadata[GROUPS_METADATA_KEY]).get(str(group))
    return None if index is None else parquet.read_row_group(index)


def dedup_group(
    scattered: Sequence[str], group: int, options: Mapping[str, Any]
) -> tuple[pa.Table, dict[str, Any]]:
    """Drops and statistics of the clusters of ``group``."""
    options = section_options("dedup", options)
    started = time.monotonic()
    pieces = [t for t in (read_group(p, group) for p in scattered) if t is not None]
    if not pieces:
        return drops.table([]), {"group": group, "clusters": 0, "items": 0, "dropped": 0}
    table = pa.concat_tables(pieces).sort_by([("label", "ascending"), ("key", "ascending")])
    labels = table["label"].to_numpy()
    keys, parts = table["key"].to_pylist(), table["part"].to_pylist()
    # Stored as float16 like the embeddings: normalise again so self-cosines are 1.
    vectors = l2_normalize(formats.column_to_numpy(table["vector"]).astype(np.float32))
    rows: list[dict[str, Any]] = []
    sizes = []
    for start, end in tqdm(runs(labels), desc=f"group {group}", unit="cluster", mininterval=5):
        sizes.append(end - start)
        dropped, twin, trigger, sim = semdedup(
            vectors[start:end], keys[start:end], options["threshold"]
        )
        for i in np.flatnonzero(dropped):
            key = keys[start + i]
            detail = f"cluster {int(labels[start])}"
            if trigger[i] != twin[i]:
                detail += f"; most similar earlier item {keys[start + trigger[i]]} (dropped too)"
            rows.append(
                {
                    "part": parts[start + i],
                    "key": key,
                    "reason": drops.NEAR_DUPLICATE,
                    "twin": keys[start + twin[i]],
                    "twin_part": parts[start + twin[i]],
                    "similarity": float(sim[i]),
                    "detail": detail,
                }
            )
    seconds = time.monotonic() - started
    stats = {
        "group": group,
        "clusters": len(sizes),
        "items": int(len(labels)),
        "dropped": len(rows),
        "largest_cluster": int(max(sizes)),
        "pairwise_flop": flops(sizes, vectors.shape[1]),
        "seconds": round(seconds, 3),
        "threshold": options["threshold"],
        "space": options["space"],
    }
    return drops.table(rows), stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.hygiene.near", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    spread = commands.add_parser("scatter", help="one batch's rows, sorted by cluster group")
    spread.add_argument("--assignments", nargs="+", required=True, help="assign/{part}.parquet")
    spread.add_argument(
        "--spaces", nargs="+", required=True, help="embed or fused files, same order"
    )
    spread.add_argument("--screened", default=None, help="the screen's drops (rows to leave out)")
    spread.add_argument("--groups", type=int, required=True, help="dedup.groups")
    spread.add_argument("--out", required=True)
    SCATTER_OPTIONS.add_to(spread)
    find = commands.add_parser("dedup", help="the near-duplicates of one group of clusters")
    find.add_argument("scattered", nargs="+", help="every batch's scatter file")
    find.add_argument("--group", type=int, required=True)
    find.add_argument("--out", required=True, help="drops Parquet")
    find.add_argument("--out-stats", required=True, help="statistics JSON")
    DEDUP_OPTIONS.add_to(find)
    args = parser.parse_args(argv)
    options = (SCATTER_OPTIONS if args.command == "scatter" else DEDUP_OPTIONS).from_args(args)
    setup_logging()
    if args.command == "scatter":
        if len(args.assignments) != len(args.spaces):
            raise UnicomError("give one --spaces file per --assignments file")
        stats = scatter(
            args.assignments, args.spaces, args.screened, args.out, options, args.groups
        )
        log.info("scattered %s", stats)
    else:
        result, stats = dedup_group(args.scattered, args.group, options)
        drops.write(args.out, result)
        write_json(args.out_stats, stats)
        log.info("group %d: %s", args.group, stats)


if __name__ == "__main__":
    run_cli(main)
