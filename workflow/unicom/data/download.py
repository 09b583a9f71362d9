"""Download URL-list parts with img2dataset, one webdataset shard each, accounting for every row.

Outputs per part (``part`` = the part file's stem), each written atomically:

- ``{part}.tar``           webdataset shard; keys are ``formats.global_key(part, row)``
- ``{part}.parquet``       one row per input row: key, status, error_message, url, caption, extras

and, once every part of the job is done, one ``--summary`` JSON: per part, the counts per status
(they add up to the input rows), per error message, and img2dataset's statistics.

Only URLs whose scheme is in ``allowed_schemes`` reach img2dataset; the others are recorded as
``rejected_scheme`` and never opened; a row split_urls marked as a repeated URL (column
``duplicate_of``) is ``duplicate_url``, not fetched either. img2dataset runs in
``OUT_DIR/.work/{part}/``, removed on success: an interrupted job leaves no finished-looking file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unicom.cli import run_cli, setup_logging
from unicom.config import section_options
from unicom.data.accounting import check_parts, summarize
from unicom.data.rekey import rewrite_tar_keys
from unicom.errors import UnicomError
from unicom.formats import CAPTION_COLUMN, DUPLICATE_OF_COLUMN, URL_COLUMN, global_key
from unicom.io import atomic_path, write_json, write_parquet
from unicom.options import StageOptions

log = logging.getLogger("unicom.data.download")
# The download section on the command line (flags, --options-json, --help).
OPTIONS = StageOptions("download")

# Carried through img2dataset as an extra column so each of its rows maps back to its input row.
ROW_COLUMN = "unicom_row"
# Local keys are the row's index in the part, shaped like img2dataset's keys (9 digits).
KEY_WIDTH = 9
REJECTED_SCHEME = "rejected_scheme"
DUPLICATE_URL = "duplicate_url"
# Columns img2dataset adds after the input columns, with the types it writes.
IMG2DATASET_COLUMNS = pa.schema(
    [
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
)


# ---------------------------------------------------------------------------------------------
# Pure core


def rejection_reason(url: str | None, allowed_schemes: Iterable[str]) -> str | None:
    """Why ``url`` must not be fetched (None when its scheme is allowed)."""
    if url is None or not url.strip():
        return "empty URL"
    try:
        scheme = urlsplit(url.strip()).scheme.lower()
    except ValueError:
        return "unparsable URL"
    allowed = sorted({s.lower() for s in allowed_schemes})
    if scheme in allowed:
        return None
    shown = f"'{scheme}'" if scheme else "missing"
    return f"URL scheme {shown} not in download.allowed_schemes {allowed}"


def partition_by_scheme(urls: Sequence[str | None], allowed_schemes: Iterable[str]) -> list[bool]:
    """Mask of the URLs that may be fetched."""
    allowed = list(allowed_schemes)
    return [rejection_reason(url, allowed) is None for url in urls]


def local_key(row: int) -> str:
    return f"{row:0{KEY_WIDTH}d}"


def img2dataset_arguments(
    options: Mapping[str, Any],
    url_list: str,
    output_folder: str,
    part_rows: int,
    extra_cols: Sequence[str],
) -> dict[str, Any]:
    """Keyword arguments of ``img2dataset.download`` for one part (one part -> one shard)."""
    return {
        "url_list": url_list,
        "output_folder": output_folder,
        "input_format": "parquet",
        "output_format": "webdataset",
        "url_col": URL_COLUMN,
        "caption_col": CAPTION_COLUMN,
        "save_additional_columns": [*extra_cols, ROW_COLUMN],
        "number_sample_per_shard": max(part_rows, 1),
        # One shard can only ever keep one process busy; threads do the parallel fetching.
        "processes_count": 1,
        "thread_count": options["threads"],
        "image_size": options["image_size"],
        "resize_mode": options["resize_mode"],
        "resize_only_if_bigger": options["resize_only_if_bigger"],
        "min_image_size": options["min_image_size"],
        "encode_format": options["encode_format"],
        "encode_quality": options["encode_quality"],
        "timeout": options["timeout"],
        "retries": options["retries"],
        "incremental_mode": options["incremental"],
        "user_agent_token": options["user_agent_token"],
        "disallowed_header_directives": list(options["disallowed_header_directives"]),
        "compute_hash": "sha256",
        "extract_exif": True,
        "enable_wandb": False,
        "distributor": "multiprocessing",
    }


def output_schema(part_schema: pa.Schema) -> pa.Schema:
    """Columns of ``{part}.parquet``: key/status/error, the part's columns, img2dataset's."""
    head = [("key", pa.string()), ("status", pa.string()), ("error_message", pa.string())]
    return pa.schema([*head, *part_schema, *IMG2DATASET_COLUMNS])


def skip_reasons(
    urls: Sequence[str | None], duplicate_of: Sequence[str | None], allowed_schemes: Iterable[str]
) -> list[tuple[str, str] | None]:
    """Per row: (status, message) when it is not fetched, else None. A URL that may not be
    fetched is rejected whether or not it repeats another."""
    allowed = list(allowed_schemes)
    reasons: list[tuple[str, str] | None] = []
    for url, twin in zip(urls, duplicate_of, strict=True):
        rejection = rejection_reason(url, allowed)
        if rejection is not None:
            reasons.append((REJECTED_SCHEME, rejection))
        elif twin is not None:
            reasons.append((DUPLICATE_URL, f"same URL as {twin}"))
        else:
            reasons.append(None)
    return reasons


def rejected_rows(
    part: str, table: pa.Table, mask: Sequence[bool], reasons: list[tuple[str, str]]
) -> pa.Table:
    """Rows of ``table`` (the part, with ROW_COLUMN) that were not fetched, as output rows."""
    rejected = table.filter(pa.array([not keep for keep in mask], pa.bool_()))
    rows = rejected.column(ROW_COLUMN).to_pylist()
    columns = {
        "key": pa.array([global_key(part, local_key(r)) for r in rows], pa.string()),
        "status": pa.array([status for status, _ in reasons], pa.string()),
        "error_message": pa.array([message for _, message in reasons], pa.string()),
    }
    columns.update({name: rejected.column(name) for name in rejected.column_names})
    columns.update({f.name: pa.nulls(len(rows), f.type) for f in IMG2DATASET_COLUMNS})
    return pa.table(columns)


def fetched_rows(part: str, img2dataset_table: pa.Table) -> tuple[pa.Table, dict[str, str]]:
    """img2dataset's per-row table with global keys; also its local key -> global key map."""
    rows = img2dataset_table.column(ROW_COLUMN).to_pylist()
    new_keys = [global_key(part, local_key(r)) for r in rows]
    key_map = dict(zip(img2dataset_table.column("key").to_pylist(), new_keys, strict=True))
    table = img2dataset_table.set_column(
        img2dataset_table.schema.get_field_index("key"), "key", pa.array(new_keys, pa.string())
    )
    return table, key_map


def merge_rows(schema: pa.Schema, tables: Sequence[pa.Table], input_rows: int) -> pa.Table:
    """Concatenate fetched and rejected rows in input order; each input row exactly once."""
    columns = [*schema.names, ROW_COLUMN]
    merged = pa.concat_tables([t.select(columns) for t in tables], promote_options="permissive")
    merged = merged.sort_by(ROW_COLUMN)
    rows = merged.column(ROW_COLUMN).to_pylist()
    if rows != list(range(input_rows)):
        missing = sorted(set(range(input_rows)) - set(rows))
        duplicated = sorted(r for r, n in Counter(rows).items() if n > 1)
        raise RuntimeError(
            f"download accounting broken: rows missing {missing[:10]}, duplicated {duplicated[:10]}"
        )
    return merged.drop_columns([ROW_COLUMN]).cast(schema)


def empty_stats(seconds: float) -> dict[str, Any]:
    """img2dataset's stats shape for a shard it never saw (no URL was allowed)."""
    now = time.time()
    return {
        "count": 0,
        "successes": 0,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": seconds,
        "start_time": now - seconds,
        "end_time": now,
        "status_dict": {},
    }


# ---------------------------------------------------------------------------------------------
# I/O


def read_part(path: Path) -> pa.Table:
    if not path.is_file():
        raise UnicomError(f"download part {path}: file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UnicomError(f"download part {path}: not a Parquet file ({err})") from None
    for column in (URL_COLUMN, CAPTION_COLUMN):
        if column not in table.column_names:
            raise UnicomError(f"download part {path}: no column '{column}'")
    if ROW_COLUMN in table.column_names:
        raise UnicomError(f"download part {path}: column '{ROW_COLUMN}' is reserved")
    return table


def prepare_work_dir(work_dir: Path, allowed: pa.Table) -> Path:
    """Write img2dataset's input; keep an earlier attempt's output only if it had the same input."""
    url_list = work_dir / "input.parquet"
    if url_list.exists():
        try:
            same = pq.read_table(url_list).equals(allowed)
        except (pa.ArrowInvalid, OSError):
            same = False
        if not same:
            log.info("discarding the earlier attempt in %s (its input differs)", work_dir)
            shutil.rmtree(work_dir)
    if not url_list.exists():
        write_parquet(url_list, allowed)
    return url_list


def run_img2dataset(arguments: Mapping[str, Any], scratch: Path) -> None:
    """Call img2dataset in this process (it spawns workers and a logger process) with TMPDIR
    ``scratch``: they import wandb, whose temporary folders they never remove."""
    # albumentations (imported by img2dataset) otherwise checks PyPI for updates on import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    scratch.mkdir(parents=True, exist_ok=True)
    previous_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)
    import img2dataset  # slow import, only needed here

    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        # img2dataset prints progress on stdout; keep our stdout for results.
        with contextlib.redirect_stdout(sys.stderr):
            img2dataset.download(**arguments)
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
        if previous_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_tmpdir


def finished_shard(folder: Path) -> str:
    """Name of the shard img2dataset completed in ``folder`` (it writes stats last)."""
    stats = sorted(folder.glob("*_stats.json"))
    if not stats:
        raise RuntimeError(f"img2dataset produced no finished shard in {folder}; see the log above")
    shard = stats[-1].name.removesuffix("_stats.json")
    for suffix in (".tar", ".parquet"):
        if not (folder / f"{shard}{suffix}").is_file():
            raise RuntimeError(f"img2dataset shard {shard} in {folder} lacks its {suffix} file")
    return shard


def download_part(part_path: str | Path, out_dir: str | Path, options: Mapping[str, Any]) -> dict:
    """Download one part; write the shard and its table; return the part's summary."""
    started = time.monotonic()
    options = section_options("download", options)
    part_path, out_dir = Path(part_path), Path(out_dir)
    part = part_path.stem
    table = read_part(part_path)
    # duplicate_of is ours (null on every fetched row): img2dataset needs not carry it.
    own_columns = (URL_COLUMN, CAPTION_COLUMN, DUPLICATE_OF_COLUMN)
    extra_cols = [c for c in table.column_names if c not in own_columns]
    schema = output_schema(table.schema)
    input_rows = table.num_rows
    table = table.append_column(ROW_COLUMN, pa.array(range(input_rows), pa.int64()))

    urls = table.column(URL_COLUMN).to_pylist()
    duplicate_of = (
        table.column(DUPLICATE_OF_COLUMN).to_pylist()
        if DUPLICATE_OF_COLUMN in table.column_names
        else [None] * input_rows
    )
    allowed_schemes = sorted({s.lower() for s in options["allowed_schemes"]})
    reasons = skip_reasons(urls, duplicate_of, allowed_schemes)
    mask = [reason is None for reason in reasons]
    rejected = rejected_rows(part, table, mask, [r for r in reasons if r is not None])
    allowed = table.filter(pa.array(mask, pa.bool_()))
    if DUPLICATE_OF_COLUMN in allowed.column_names:
        allowed = allowed.drop_columns([DUPLICATE_OF_COLUMN])
    log.info(
        "part %s: %d rows, %d to fetch, %d not fetched (scheme or repeated URL)",
        *(part, input_rows, allowed.num_rows, rejected.num_rows),
    )

    work_dir = out_dir / ".work" / part
    tables = [rejected]
    with atomic_path(out_dir / f"{part}.tar") as tmp_tar:
        if allowed.num_rows:
            url_list = prepare_work_dir(work_dir, allowed)
            i2d_dir = work_dir / "img2dataset"
            run_img2dataset(
                img2dataset_arguments(options, str(url_list), str(i2d_dir), input_rows, extra_cols),
                work_dir / "tmp",
            )
            shard = finished_shard(i2d_dir)
            fetched, key_map = fetched_rows(part, pq.read_table(i2d_dir / f"{shard}.parquet"))
            if DUPLICATE_OF_COLUMN in schema.names:  # every fetched row is a first occurrence
                nulls = pa.nulls(fetched.num_rows, pa.string())
                fetched = fetched.append_column(DUPLICATE_OF_COLUMN, nulls)
            tables.append(fetched)
            tar_keys = rewrite_tar_keys(i2d_dir / f"{shard}.tar", tmp_tar, key_map, [ROW_COLUMN])
            stats = json.loads((i2d_dir / f"{shard}_stats.json").read_text())
        else:
            tarfile.open(tmp_tar, "w").close()  # a valid, empty shard
            tar_keys, stats = set(), empty_stats(time.monotonic() - started)

        result = merge_rows(schema, tables, input_rows)
        success_keys = set(
            pc.filter(result["key"], pc.equal(result["status"], "success")).to_pylist()
        )
        if tar_keys != success_keys:
            raise RuntimeError(
                f"part {part}: {len(tar_keys)} samples in the tar but {len(success_keys)} successes"
            )
        summary = summarize(part, result, input_rows, time.monotonic() - started)
    write_parquet(out_dir / f"{part}.parquet", result)
    summary["img2dataset"] = stats
    shutil.rmtree(work_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # other parts may still be working beside us
        (out_dir / ".work").rmdir()
    log.info("part %s: %s in %.1f s", part, summary["counts"], summary["seconds"])
    return summary


def download_parts(
    part_paths: Sequence[str | Path],
    out_dir: str | Path,
    summary_path: str | Path,
    options: Mapping[str, Any],
    min_success_rate: float | None = None,
) -> list[dict]:
    """Download the parts in turn, then write their summaries as one JSON (the job's last file).
    The job stops as soon as the parts fetched so far fall below ``min_success_rate``."""
    names = [Path(p).stem for p in part_paths]
    if len(set(names)) != len(names):
        raise UnicomError(f"a part is given twice: {names}")
    summaries: list[dict] = []
    for part in part_paths:
        summaries.append(download_part(part, out_dir, options))
        check_parts(summaries, min_success_rate)
    write_json(summary_path, {"parts": summaries})
    return summaries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.data.download", description=__doc__)
    parser.add_argument(
        "--part", nargs="+", required=True, help="URL-list parts (split_urls output), in turn"
    )
    parser.add_argument("--out-dir", required=True, help="folder receiving the shard files")
    parser.add_argument("--summary", required=True, help="JSON summary of the job's parts")
    parser.add_argument(
        "--min-success-rate", type=float, help="download.min_success_rate (none: no floor)"
    )
    OPTIONS.add_to(parser)
    args = parser.parse_args(argv)
    options = OPTIONS.from_args(args)
    setup_logging()
    download_parts(args.part, args.out_dir, args.summary, options, args.min_success_rate)


if __name__ == "__main__":
    run_cli(main)
