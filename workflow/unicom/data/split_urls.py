"""Split LAION-style URL lists into parts of at most ``shard_size`` rows (one shard each).

Rows are spread evenly: ``ceil(rows / shard_size)`` parts, rounded up to a multiple of
``shards_per_job``, because each per-shard job (download, embed, fuse, assign) takes the
``shards_per_job`` parts whose names differ only in their last digits (``00120``-``00129``
for 10) and its outputs are declared up front: every such batch must be complete.

Columns are renamed to the standard ``url``/``caption`` and the configured extra columns are
carried along. With ``dedup_urls`` a URL seen earlier in the list (global row order, scheme and
host compared case-insensitively) gets column ``duplicate_of``: the key of its first row;
download then records it as ``duplicate_url`` instead of fetching it (``unicom.duplicates``:
hashes bucketed on disk, never the list's URLs in memory). The output folder (parts + ``manifest.json``) appears atomically, because
Snakemake treats it as a checkpoint: a half-written folder must never look finished.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from unicom import duplicates
from unicom.cli import run_cli, setup_logging
from unicom.errors import UnicomError
from unicom.formats import CAPTION_COLUMN, DUPLICATE_OF_COLUMN, URL_COLUMN, global_key, part_name
from unicom.io import atomic_dir, write_json
from unicom.url_list import check_url_list

log = logging.getLogger("unicom.data.split_urls")

BATCH_ROWS = 65_536
# Parts per job: the parts of one job share all but the last log10(n) digits of their names.
SHARDS_PER_JOB_CHOICES = (1, 10, 100, 1000)


def target_schema(
    first_file_schema: pa.Schema, url_col: str, caption_col: str, extra_cols: Sequence[str]
) -> pa.Schema:
    """Schema of every part: string url/caption, then the extra columns as in the first file."""
    fields = [pa.field(URL_COLUMN, pa.string()), pa.field(CAPTION_COLUMN, pa.string())]
    fields += [first_file_schema.field(name) for name in extra_cols]
    return pa.schema(fields)


def standardize_batch(
    batch: pa.RecordBatch,
    schema: pa.Schema,
    url_col: str,
    caption_col: str,
    extra_cols: Sequence[str],
) -> pa.Table:
    """Select and rename the columns of one input batch and cast them to the parts' schema."""
    table = pa.Table.from_batches([batch]).select([url_col, caption_col, *extra_cols])
    table = table.rename_columns([URL_COLUMN, CAPTION_COLUMN, *extra_cols])
    return table.cast(schema)


def part_sizes(total_rows: int, shard_size: int, shards_per_job: int = 1) -> list[int]:
    """Rows of each part: at most ``shard_size``, as even as possible, a multiple of
    ``shards_per_job`` parts (the first ``total_rows % parts`` get one row more)."""
    if shard_size < 1:
        raise UnicomError(f"config key download.shard_size: must be >= 1, got {shard_size}")
    if shards_per_job not in SHARDS_PER_JOB_CHOICES:
        raise UnicomError(
            f"config key download.shards_per_job: must be one of "
            f"{', '.join(map(str, SHARDS_PER_JOB_CHOICES))}, got {shards_per_job}"
        )
    parts = -(-total_rows // shard_size)  # ceil
    parts = -(-parts // shards_per_job) * shards_per_job
    if total_rows < parts:
        raise UnicomError(
            f"config key download.shards_per_job: {total_rows} rows cannot fill "
            f"{parts} shards; lower shards_per_job"
        )
    base, extra = divmod(total_rows, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def chunk_rows(tables: Iterator[pa.Table], sizes: Sequence[int]) -> Iterator[list[pa.Table]]:
    """Regroup a stream of tables into lists of slices holding ``sizes[i]`` rows each.

    Rows beyond ``sum(sizes)`` are an error; only one part's rows are held at a time.
    """
    wanted = iter(sizes)
    size = next(wanted, 0)
    pending: list[pa.Table] = []
    pending_rows = 0
    for table in tables:
        offset = 0
        while offset < table.num_rows:
            if size == 0:
                raise UnicomError("URL list has more rows than its metadata said")
            take = min(size - pending_rows, table.num_rows - offset)
            pending.append(table.slice(offset, take))
            pending_rows += take
            offset += take
            if pending_rows == size:
                yield pending
                pending, pending_rows = [], 0
                size = next(wanted, 0)
    if pending_rows:
        yield pending


def row_keys(rows: np.ndarray, sizes: Sequence[int]) -> list[str]:
    """Global sample keys of global row numbers, given the parts' sizes (as download names
    them: part name + the row's index in its part, 9 digits)."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = np.searchsorted(starts, rows, side="right") - 1
    return [
        global_key(part_name(int(p)), f"{int(r - starts[p]):09d}")
        for p, r in zip(parts, rows, strict=True)
    ]


def find_duplicate_urls(
    paths: Sequence[str | Path], url_col: str, used_rows: int, work_dir: Path
) -> tuple[duplicates.Duplicates, dict[str, Any]]:
    """Rows (global, among the first ``used_rows``) whose normalised URL occurred before."""
    started = time.monotonic()

    def replay():
        wanted = used_rows
        for path in paths:
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[url_col]):
                if wanted <= 0:
                    return
                urls = duplicates.normalize_urls(batch.column(0).slice(0, wanted).cast(pa.string()))
                wanted -= len(urls)
                yield duplicates.hash64(urls), urls

    repeats = duplicates.dedup_stream(replay, work_dir, used_rows)
    stats = {
        "duplicates": len(repeats.rows),
        "candidate_rows": repeats.candidates,
        "hash_collisions": repeats.collisions,
        "seconds": round(time.monotonic() - started, 3),
    }
    log.info("URL dedup: %s", stats)
    return repeats, stats


def duplicate_of_column(
    repeats: duplicates.Duplicates, first_row: int, rows: int, sizes: Sequence[int]
) -> pa.Array:
    """``duplicate_of`` of global rows [first_row, first_row + rows): the first row's key."""
    lo, hi = np.searchsorted(repeats.rows, [first_row, first_row + rows])
    column: list[str | None] = [None] * rows
    keys = row_keys(repeats.firsts[lo:hi], sizes)
    for row, key in zip(repeats.rows[lo:hi], keys, strict=True):
        column[int(row) - first_row] = key
    return pa.array(column, pa.string())


def with_duplicate_of(
    table: pa.Table, repeats: duplicates.Duplicates | None, first_row: int, sizes: Sequence[int]
) -> pa.Table:
    """``table`` (global rows from ``first_row``) with its duplicate_of column, when deduped."""
    if repeats is None:
        return table
    column = duplicate_of_column(repeats, first_row, table.num_rows, sizes)
    return table.append_column(DUPLICATE_OF_COLUMN, column)


def split_url_lists(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    shard_size: int,
    url_col: str = URL_COLUMN,
    caption_col: str = CAPTION_COLUMN,
    extra_cols: Sequence[str] = (),
    shards_per_job: int = 1,
    max_rows: int | None = None,
    dedup_urls: bool = False,
) -> dict[str, Any]:
    """Write the parts and manifest into ``out_dir`` (atomically); return the manifest.

    ``max_rows``: only the first rows of the list (files in the given order) are split; the
    manifest counts the rows left out. ``dedup_urls``: mark repeated URLs (``duplicate_of``).
    """
    part_sizes(shards_per_job, shard_size, shards_per_job)  # option errors before any reading
    if max_rows is not None and max_rows < 1:
        raise UnicomError(f"config key data.max_rows: must be >= 1, got {max_rows}")
    total_rows = check_url_list(paths, url_col, caption_col, extra_cols)
    used_rows = total_rows if max_rows is None else min(total_rows, max_rows)
    sizes = part_sizes(used_rows, shard_size, shards_per_job)
    input_schema = target_schema(pq.read_schema(paths[0]), url_col, caption_col, extra_cols)
    schema = input_schema
    if dedup_urls:
        schema = schema.append(pa.field(DUPLICATE_OF_COLUMN, pa.string()))
    inputs: list[dict[str, Any]] = []
    repeats: duplicates.Duplicates | None = None
    url_dedup: dict[str, Any] = {"enabled": dedup_urls}

    def standardized_tables() -> Iterator[pa.Table]:
        wanted = used_rows
        done = 0
        for path in paths:
            parquet = pq.ParquetFile(path)
            inputs.append({"path": str(path), "rows": parquet.metadata.num_rows})
            columns = [url_col, caption_col, *extra_cols]
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                if wanted <= 0:  # data.max_rows reached: the files' counts are still recorded
                    break
                batch = batch.slice(0, wanted)
                wanted -= batch.num_rows
                try:
                    table = standardize_batch(batch, input_schema, url_col, caption_col, extra_cols)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                    raise UnicomError(
                        f"URL list {path}: columns do not match the first file's types "
                        f"{input_schema} ({str(err).splitlines()[0]})"
                    ) from None
                table = with_duplicate_of(table, repeats, done, sizes)
                done += table.num_rows
                yield table

    parts: list[str] = []
    with atomic_dir(out_dir) as tmp_dir:
        if dedup_urls:
            repeats, stats = find_duplicate_urls(paths, url_col, used_rows, tmp_dir / ".dedup")
            url_dedup.update(stats)
        progress = tqdm(total=used_rows, unit="row", desc="split", mininterval=5)
        for index, slices in enumerate(chunk_rows(standardized_tables(), sizes)):
            name = part_name(index)
            with pq.ParquetWriter(tmp_dir / f"{name}.parquet", schema) as writer:
                for piece in slices:
                    writer.write_table(piece)
                    progress.update(piece.num_rows)
            parts.append(name)
        progress.close()
        manifest = {
            "inputs": inputs,
            "total_rows": sum(item["rows"] for item in inputs),
            # data.max_rows: the rows after the first max_rows are left out of every part.
            "max_rows": max_rows,
            "rows_left_out": total_rows - used_rows,
            "shard_size": shard_size,
            "shards_per_job": shards_per_job,
            "columns": schema.names,
            "parts": parts,
            "url_dedup": url_dedup,
        }
        if manifest["total_rows"] != total_rows or len(parts) != len(sizes):
            # a file changed while we read it
            raise UnicomError(
                f"URL list changed during the split: {manifest['total_rows']} rows read, "
                f"{total_rows} expected"
            )
        write_json(tmp_dir / "manifest.json", manifest)
    log.info(
        "%d of %d rows from %d files -> %d parts in %s",
        used_rows,
        total_rows,
        len(inputs),
        len(parts),
        out_dir,
    )
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.data.split_urls", description=__doc__)
    parser.add_argument("inputs", nargs="+", help="URL-list Parquet files (globs already expanded)")
    parser.add_argument("--out-dir", required=True, help="folder receiving the parts + manifest")
    parser.add_argument("--shard-size", type=int, required=True, help="rows per part, at most")
    parser.add_argument(
        "--shards-per-job", type=int, default=1, help="parts per job (1, 10, 100 or 1000)"
    )
    parser.add_argument("--url-col", default=URL_COLUMN, help="input column with the URL")
    parser.add_argument(
        "--caption-col", default=CAPTION_COLUMN, help="input column with the caption"
    )
    parser.add_argument(
        "--extra-cols",
        nargs="*",
        default=[],
        help="input columns carried along (put INPUTS before this option, or end it with --)",
    )
    parser.add_argument(
        "--max-rows", type=int, default=None, help="split only the first rows of the list"
    )
    parser.add_argument(
        "--dedup-urls", action="store_true", help="mark repeated URLs (column duplicate_of)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    split_url_lists(
        args.inputs,
        args.out_dir,
        args.shard_size,
        args.url_col,
        args.caption_col,
        args.extra_cols,
        args.shards_per_job,
        args.max_rows,
        args.dedup_urls,
    )


if __name__ == "__main__":
    run_cli(main)
