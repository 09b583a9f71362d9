"""The LAION-style URL list (data.url_list) checked from its Parquet footers alone.

The Snakefile runs :func:`check_url_list` at parse time, before any job, and split_urls again
in its job: a footer holds the schema and the row count, so even 40,000 files cost no full read.
Library layer: imports only ``unicom.errors``, ``unicom.formats`` and pyarrow.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from unicom.errors import UnicomError
from unicom.formats import CAPTION_COLUMN, DUPLICATE_OF_COLUMN, URL_COLUMN

# Columns img2dataset writes itself; an extra column with one of these names would clash.
RESERVED_COLUMNS = frozenset(
    {
        URL_COLUMN,
        CAPTION_COLUMN,
        "key",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "exif",
        "md5",
        "sha256",
        "sha512",
        DUPLICATE_OF_COLUMN,
    }
)
# Footers read at once: on a network file system each read mostly waits for the server.
FOOTER_THREADS = 16


def check_extra_cols(extra_cols: Sequence[str]) -> None:
    """Extra column names must be distinct and not clash with the columns img2dataset writes."""
    seen: set[str] = set()
    for name in extra_cols:
        if name in RESERVED_COLUMNS:
            raise UnicomError(
                f"config key data.extra_cols: column '{name}' is reserved "
                "(url/caption/img2dataset's own columns); leave it out"
            )
        if name in seen:
            raise UnicomError(f"config key data.extra_cols: column '{name}' is listed twice")
        seen.add(name)


def read_footer(path: str | Path) -> tuple[pa.Schema, int]:
    """The schema and row count of one URL-list file, from its Parquet footer."""
    path = Path(path)
    if not path.exists():
        raise UnicomError(f"URL list {path}: file not found")
    if not path.is_file():
        raise UnicomError(f"URL list {path}: not a file")
    try:
        metadata = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnicomError(
            f"URL list {path}: not a Parquet file ({reason}); data.url_list takes Parquet: "
            "convert it first (a CSV: pandas.read_csv(FILE).to_parquet(NEW_FILE))"
        ) from None
    return metadata.schema.to_arrow_schema(), metadata.num_rows


def read_footers(paths: Sequence[str | Path]) -> list[tuple[pa.Schema, int]]:
    """:func:`read_footer` of every file, in order (the first bad file's error is raised)."""
    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        return list(pool.map(read_footer, paths))


def check_url_list(
    paths: Sequence[str | Path], url_col: str, caption_col: str, extra_cols: Sequence[str]
) -> int:
    """Check the URL list from its Parquet footers only; return its total row count.

    Raises UnicomError (one line) for: no files, a missing file, a non-Parquet file, a missing
    column (naming the config key that names it and the file's columns), a list without rows
    and a file without rows.
    """
    if not paths:
        raise UnicomError("config key data.url_list: no input files")
    check_extra_cols(extra_cols)
    if url_col == caption_col:
        raise UnicomError(f"config keys data.url_col and data.caption_col are both '{url_col}'")
    wanted = [("data.url_col", url_col), ("data.caption_col", caption_col)]
    wanted += [("data.extra_cols", name) for name in extra_cols]
    footers = read_footers(paths)
    for path, (schema, _) in zip(paths, footers, strict=True):
        for key, column in wanted:
            if column not in schema.names:
                raise UnicomError(
                    f"URL list {path}: no column '{column}' (config key {key}); "
                    f"it has {', '.join(schema.names)}"
                )
    total = sum(rows for _, rows in footers)
    if total == 0:
        raise UnicomError("config key data.url_list: the URL list has no rows")
    for path, (_, rows) in zip(paths, footers, strict=True):
        if rows == 0:
            raise UnicomError(f"URL list {path} has no rows")
    return total
