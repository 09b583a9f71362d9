"""Where each precomputed embedding row goes: the ``locate`` step of unicom.embed.precomputed.

clip-retrieval numbers its files by its own partitions (partition i takes every n-th tar), so
one shard's rows can be in any file. Each metadata file's keys (``image_path``) are placed in
the part whose key range holds them (the ranges come from the link jobs' summaries and may not
interleave: shards/keys.json); ``scatter/{N}.parquet`` keeps file N's placed rows (batch, part, key, row) sorted
by job batch, one row group per batch, and the index says which files each batch needs. A file
whose keys (footer statistics) miss every range is not read: a rehearsal's first shards read
only the files that hold them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unicom import sources
from unicom.formats import batch_name, read_manifest
from unicom.io import atomic_path, write_json

log = logging.getLogger("unicom.embed.locate")

BATCH_INDEX_KEY = b"unicom.precomputed.batches"


def place_keys(keys: Sequence[str], firsts: np.ndarray, lasts: np.ndarray) -> np.ndarray:
    """Index of the range that holds each key, -1 for none."""
    if not len(firsts) or not len(keys):
        return np.full(len(keys), -1, np.int64)
    encoded = np.array([key.encode() for key in keys], dtype=bytes)
    index = np.searchsorted(firsts, encoded, side="right") - 1
    inside = (index >= 0) & (encoded <= lasts[np.maximum(index, 0)])
    return np.where(inside, index, -1)


def misses_every_range(metadata: str, firsts: np.ndarray, lasts: np.ndarray) -> bool:
    """From the footer's statistics: no key of the file can be in a range."""
    if not len(firsts):
        return True
    column = pq.read_schema(metadata).get_field_index(sources.KEY_COLUMN)
    footer = pq.read_metadata(metadata)
    for group in range(footer.num_row_groups):
        stats = footer.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            return False
        low, high = (str(v).encode() for v in (stats.min, stats.max))
        index = np.searchsorted(firsts, np.array([high], dtype=bytes), side="right")[0] - 1
        if index >= 0 and low <= lasts[index]:
            return False
    return True


def scatter_file(
    item: sources.EmbeddingFile, places: Mapping[str, Any], shards_per_job: int, out: Path
) -> dict[str, Any]:
    """Write file N's rows that fall in a shard's range, sorted by batch; return its counts."""
    parts, firsts, lasts = places["parts"], places["firsts"], places["lasts"]
    if misses_every_range(item.metadata, firsts, lasts):
        keys, where = [], np.zeros(0, np.int64)
        read = False
    else:
        keys = pq.read_table(item.metadata, columns=[sources.KEY_COLUMN]).column(0)
        keys = keys.cast(pa.string()).to_pylist()
        where = place_keys(keys, firsts, lasts)
        read = True
    rows = np.flatnonzero(where >= 0)
    part = [parts[i] for i in where[rows]]
    batch = [batch_name(p, shards_per_job) for p in part]
    table = pa.table(
        {
            "batch": pa.array(batch, pa.string()),
            "part": pa.array(part, pa.string()),
            "key": pa.array([keys[r] for r in rows], pa.string()),
            "row": pa.array(rows, pa.int64()),
        }
    ).sort_by([("batch", "ascending"), ("row", "ascending")])
    ordered = table["batch"].to_pylist()
    starts = [i for i, name in enumerate(ordered) if i == 0 or name != ordered[i - 1]]
    bounds = [*starts, len(ordered)]
    index = {ordered[start]: group for group, start in enumerate(starts)}
    table = table.replace_schema_metadata({BATCH_INDEX_KEY: json.dumps(index).encode()})
    with atomic_path(out / f"{item.number}.parquet") as tmp:
        with pq.ParquetWriter(tmp, table.schema) as writer:
            # exactly one row group per batch (the index above counts on it)
            for start, end in zip(bounds, bounds[1:], strict=False):
                writer.write_table(table.slice(start, end - start), row_group_size=end - start)
    return {
        **item.as_json(),
        "read": read,
        "placed": int(len(rows)),
        "outside": item.rows - int(len(rows)),
        "batches": sorted(index),
    }


def read_batch(scatter_dir: str | Path, number: int, batch: str) -> pa.Table | None:
    """The rows of embedding file ``number`` that belong to ``batch`` (one row group)."""
    parquet = pq.ParquetFile(Path(scatter_dir) / f"{number}.parquet")
    group = json.loads(parquet.schema_arrow.metadata[BATCH_INDEX_KEY]).get(batch)
    return None if group is None else parquet.read_row_group(group)


def locate(
    key_ranges: str, parts_dir: str, folder: str, scatter_dir: str, index_path: str
) -> dict[str, Any]:
    """Scatter every embedding file's rows to the job batches of the shards that hold them
    (``key_ranges``: the shards' key ranges, shards/keys.json)."""
    manifest = read_manifest(parts_dir)
    ranges = json.loads(Path(key_ranges).read_text())["ranges"]
    parts, firsts, lasts = sources.range_arrays(ranges)
    places = {"parts": parts, "firsts": firsts, "lasts": lasts}
    files = sources.embedding_files(folder)
    out = Path(scatter_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = [scatter_file(item, places, manifest["shards_per_job"], out) for item in files]
    batches: dict[str, list[int]] = {}
    for item in counts:
        for batch in item["batches"]:
            batches.setdefault(batch, []).append(item["number"])
    index = {
        "folder": folder,
        "files": counts,
        "batches": batches,
        "rows": sum(item["rows"] for item in counts),
        "shards_left_out": manifest.get("shards_left_out", 0),
    }
    write_json(index_path, index)
    placed = sum(item["placed"] for item in counts)
    log.info(
        "%d embedding rows in %d files, %d in the shards' key ranges",
        index["rows"],
        len(counts),
        placed,
    )
    return index
