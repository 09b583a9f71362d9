"""Dropped rows: one Parquet format for every hygiene stage, read by k-means and training.

Columns: ``part``, ``key``, ``reason`` (``duplicate_content``, ``filtered``, ``near_duplicate``),
``twin`` (the kept row it repeats, or null) and ``twin_part`` (its part), ``similarity``
(near-duplicates) and ``detail`` (which filter). Parts are named, never parsed from a key:
existing shards (data.shards) keep their own keys. Files are sorted by part, so a reader that wants a few parts prunes row groups.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from unicom.errors import UnicomError
from unicom.io import atomic_path

SCHEMA = pa.schema(
    [
        ("part", pa.string()),
        ("key", pa.string()),
        ("reason", pa.string()),
        ("twin", pa.string()),
        ("similarity", pa.float32()),
        ("detail", pa.string()),
        ("twin_part", pa.string()),
    ]
)
DUPLICATE_CONTENT = "duplicate_content"
FILTERED = "filtered"
NEAR_DUPLICATE = "near_duplicate"
REASONS = (DUPLICATE_CONTENT, FILTERED, NEAR_DUPLICATE)
ROW_GROUP_ROWS = 65_536


def table(rows: Sequence[dict]) -> pa.Table:
    """Drop rows (dicts with the schema's keys; missing ones are null), sorted by part, key."""
    columns = {name: [row.get(name) for row in rows] for name in SCHEMA.names}
    result = pa.table(columns, schema=SCHEMA)
    return result.sort_by([("part", "ascending"), ("key", "ascending")])


def write(path: str | Path, drops: pa.Table) -> None:
    """Small row groups, so that a reader of a few parts skips the rest by their statistics."""
    with atomic_path(path) as tmp:
        pq.write_table(drops.cast(SCHEMA), tmp, row_group_size=ROW_GROUP_ROWS)


def read(paths: Iterable[str], parts: Iterable[str] | None = None) -> pa.Table:
    """The drops of ``paths`` (of ``parts`` only, when given); a key dropped twice keeps the
    first file's reason."""
    wanted = None if parts is None else sorted(set(parts))
    tables = []
    for path in paths:
        try:
            filters = None if wanted is None else [("part", "in", wanted)]
            tables.append(pq.read_table(path, schema=SCHEMA, filters=filters))
        except (OSError, pa.ArrowInvalid) as err:
            raise UnicomError(f"{path}: not a drops file ({str(err).splitlines()[0]})") from None
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables)


def reasons_by_key(drops: pa.Table) -> dict[str, str]:
    keys, reasons = drops["key"].to_pylist(), drops["reason"].to_pylist()
    result: dict[str, str] = {}
    for key, reason in zip(keys, reasons, strict=True):
        result.setdefault(key, reason)
    return result


def count_reasons(drops: pa.Table) -> dict[str, int]:
    return dict(sorted(Counter(drops["reason"].to_pylist()).items()))
