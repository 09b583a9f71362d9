"""Existing webdataset shards (data.shards) as the run's data, in place of split + download.

``index`` (one local job) writes the parts folder the other stages read (``manifest.json``:
the parts, and the tar each one is; empty parts pad the last batch of shards_per_job).
``link`` (one job per batch of parts, like download) makes each part what a download would
have made, without copying a byte of the images:

- ``{part}.tar``      a symlink to the user's tar (an empty tar for a padding part)
- ``{part}.parquet``  one row per sample and per failed row: img2dataset's status table
                      beside the tar when there is one, reconciled with the tar's headers
- ``{batch}.summary.json`` per part the counts per status, as download writes them, plus
                      the tar, its table and its key range

``keys`` (one local job) checks that the shards' key ranges do not interleave (keys must be
unique across shards) and writes them (``keys.json``: where precomputed embeddings go).

Every sample is accounted for: a table row whose sample is not in the tar is
``missing_from_shard``; a sample in the tar that its table lacks (or every sample, without a
table) is a ``success`` row with the URL and caption of its .json / .txt members.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from unicom import sources
from unicom.cli import add_each_part_option, expand_parts, run_cli, setup_logging
from unicom.data.download import IMG2DATASET_COLUMNS, summarize
from unicom.errors import UnicomError
from unicom.formats import CAPTION_COLUMN, URL_COLUMN
from unicom.io import atomic_dir, atomic_path, atomic_symlink, write_json, write_parquet
from unicom.shards import group_tar_members, split_member_name

log = logging.getLogger("unicom.data.existing")

SUCCESS = "success"
MISSING_FROM_SHARD = "missing_from_shard"
# What a padding part's --source is.
NO_SOURCE = "-"
HEAD = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        (URL_COLUMN, pa.string()),
        (CAPTION_COLUMN, pa.string()),
    ]
)
EMPTY_SCHEMA = pa.schema([*HEAD, *IMG2DATASET_COLUMNS])


# ---------------------------------------------------------------------------------------------
# index


def files_digest(files: Sequence[str]) -> str:
    """Names the exact list of tars, so that the index job sees the parse's list."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def index_shards(
    patterns: Sequence[str], out_dir: str, take: int, shards_per_job: int, digest: str
) -> dict[str, Any]:
    """Write the parts folder (manifest.json) for the first ``take`` tars of ``patterns``."""
    files = sources.shard_files(patterns)
    if files_digest(files) != digest:
        raise UnicomError(
            f"config key data.shards: the files matched changed since the run was planned "
            f"({len(files)} now); run again"
        )
    parts = sources.padded_parts(take, shards_per_job)
    manifest = {
        "source": "shards",
        "patterns": list(patterns),
        "parts": parts,
        "shards": {part: (files[i] if i < take else None) for i, part in enumerate(parts)},
        "shards_per_job": shards_per_job,
        "files": len(files),
        # data.max_rows takes whole shards: the rest are left out, and never read
        "shards_left_out": len(files) - take,
        # the rows are counted by the link jobs, from the shards themselves
        "total_rows": None,
        "rows_left_out": 0,
    }
    with atomic_dir(out_dir) as tmp_dir:
        write_json(tmp_dir / "manifest.json", manifest)
    log.info("%d of %d shards -> %d parts in %s", take, len(files), len(parts), out_dir)
    return manifest


# ---------------------------------------------------------------------------------------------
# link: pure core


def tar_samples(names: Sequence[str], source: str) -> dict[str, set[str]]:
    """Sample key -> its member extensions, in archive order, from member names."""
    return {
        sample.key: set(sample.files)
        for sample in group_tar_members(((name, b"") for name in names), source)
    }


def reconcile(
    table: pa.Table, samples: Mapping[str, set[str]], extra_rows: pa.Table | None
) -> tuple[pa.Table, dict[str, int]]:
    """The part's rows: ``table`` (the status table) with its statuses set from the tar, then
    ``extra_rows`` (samples of the tar the table lacks). Returns the rows and what changed."""
    keys = table.column("key").to_pylist()
    twice = [key for key, count in Counter(keys).items() if count > 1]
    if twice:
        raise UnicomError(f"key {twice[0]!r} is in the status table twice")
    statuses = table.column("status").to_pylist()
    messages = table.column("error_message").to_pylist()
    missing = corrected = 0
    for i, (key, status) in enumerate(zip(keys, statuses, strict=True)):
        if key in samples and status != SUCCESS:
            statuses[i], messages[i] = SUCCESS, None  # the tar has it: it was downloaded
            corrected += 1
        elif key not in samples and status == SUCCESS:
            statuses[i] = MISSING_FROM_SHARD
            messages[i] = "the status table says success, but the tar has no such sample"
            missing += 1
    table = table.set_column(1, "status", pa.array(statuses, pa.string()))
    table = table.set_column(2, "error_message", pa.array(messages, pa.string()))
    added = 0 if extra_rows is None else extra_rows.num_rows
    if extra_rows is not None and added:
        table = pa.concat_tables([table, extra_rows], promote_options="permissive")
    return table, {
        MISSING_FROM_SHARD: missing,
        "not_in_table": added,
        "status_from_tar": corrected,
    }


def standard_table(table: pa.Table) -> pa.Table:
    """A status table with download's leading columns (key, status, error_message, url,
    caption) first, img2dataset's own present (null where it had none), the rest after."""
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    for field in [*HEAD, *IMG2DATASET_COLUMNS]:
        if field.name in table.column_names:
            columns[field.name] = table.column(field.name)
        else:
            columns[field.name] = pa.nulls(table.num_rows, field.type)
    rest = [name for name in table.column_names if name not in columns]
    ordered = [*HEAD.names, *rest, *IMG2DATASET_COLUMNS.names]
    columns.update({name: table.column(name) for name in rest})
    return pa.table({name: columns[name] for name in ordered})


def success_rows(keys: Sequence[str], members: Mapping[str, Mapping[str, bytes]]) -> pa.Table:
    """Rows for samples of the tar that no status table describes: url from the .json member,
    caption from .txt (else the .json's), as embed reads them."""
    urls, captions = [], []
    for key in keys:
        files = members.get(key, {})
        meta: Any = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"])
            except (ValueError, UnicodeDecodeError):
                meta = {}
        meta = meta if isinstance(meta, dict) else {}
        urls.append(None if meta.get(URL_COLUMN) is None else str(meta[URL_COLUMN]))
        text = files.get("txt")
        caption = text.decode("utf-8", "replace") if text is not None else meta.get("caption")
        captions.append(None if caption is None else str(caption))
    return pa.table(
        {
            "key": pa.array(list(keys), pa.string()),
            "status": pa.array([SUCCESS] * len(keys), pa.string()),
            "error_message": pa.nulls(len(keys), pa.string()),
            URL_COLUMN: pa.array(urls, pa.string()),
            CAPTION_COLUMN: pa.array(captions, pa.string()),
        }
    )


# ---------------------------------------------------------------------------------------------
# link: I/O


def read_tar(path: str, wanted: set[str] | None) -> tuple[dict[str, set[str]], dict]:
    """The samples of a tar from its headers, and the .json/.txt members of the samples in
    ``wanted`` (of every sample with None): the only data read."""
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, mode="r:") as archive:
            infos = [info for info in archive if info.isfile()]
            samples = tar_samples([info.name for info in infos], path)
            for info in infos:
                key, extension = split_member_name(info.name)
                if extension in ("json", "txt") and (wanted is None or key in wanted):
                    data = archive.extractfile(info)
                    members.setdefault(key, {})[extension] = data.read() if data else b""
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UnicomError(f"{path}: not a readable uncompressed tar shard ({err})") from None
    return samples, members


def read_status_table(path: str) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise UnicomError(f"{path}: not a readable status table ({err})") from None
    for column in ("key", "status"):
        if column not in table.column_names:
            raise UnicomError(f"{path}: no {column!r} column (not img2dataset's status table)")
    if "error_message" not in table.column_names:
        table = table.append_column("error_message", pa.nulls(table.num_rows, pa.string()))
    key_index = table.schema.get_field_index("key")
    table = table.set_column(key_index, "key", table.column("key").cast(pa.string()))
    order = ["key", "status", "error_message"]
    return table.select(order + [c for c in table.column_names if c not in order])


def part_rows(source: str) -> tuple[pa.Table, dict[str, Any]]:
    """The status rows of one tar, and what the summary says about its samples."""
    table_path = sources.status_table(source)
    if table_path is None:
        samples, members = read_tar(source, None)
        rows, changes = success_rows(list(samples), members), {"not_in_table": len(samples)}
    else:
        known = read_status_table(table_path)
        samples = read_tar(source, set())[0]
        known_keys = set(known.column("key").to_pylist())
        extra = [key for key in samples if key not in known_keys]
        members = read_tar(source, set(extra))[1] if extra else {}
        extra_rows = standard_table(success_rows(extra, members))
        rows, changes = reconcile(standard_table(known), samples, extra_rows)
    keys = list(samples)
    details = {
        "source": source,
        "table": table_path,
        "samples": len(keys),
        "keys": [min(keys), max(keys)] if keys else None,
        **changes,
    }
    return standard_table(rows), details


def link_part(part: str, source: str | None, out_dir: Path, schema: pa.Schema) -> dict[str, Any]:
    """Link one part's tar and write its status table; return its summary."""
    started = time.monotonic()
    shard, table_path = out_dir / f"{part}.tar", out_dir / f"{part}.parquet"
    if source is None:  # padding: an empty shard, like a download of no row
        with atomic_path(shard) as tmp:
            tarfile.open(tmp, "w").close()
        rows, details = schema.empty_table(), {"source": None, "samples": 0, "keys": None}
    else:
        if Path(source).resolve().parent == out_dir.resolve():
            raise UnicomError(
                f"config key data.shards: {source} is in this run's own shards folder; "
                "give the run another output_dir"
            )
        rows, details = part_rows(source)
        atomic_symlink(source, shard)
    write_parquet(table_path, rows)
    summary = summarize(part, rows, rows.num_rows, time.monotonic() - started)
    summary.update(details)
    log.info("part %s <- %s: %s", part, source, summary["counts"])
    return summary


def link_parts(
    parts: Sequence[str], shard_sources: Sequence[str], out_dir: str, summary_path: str
) -> list[dict[str, Any]]:
    """Link the parts of one job in turn, then write their summaries (the job's last file).
    Padding parts get the widest schema of the job's real ones (the screen reads the same
    columns in every part)."""
    if len(parts) != len(shard_sources):
        raise UnicomError(f"{len(parts)} parts but {len(shard_sources)} sources")
    out = Path(out_dir)
    summaries: list[dict[str, Any]] = []
    schema = EMPTY_SCHEMA
    pending: list[str] = []
    for part, source in zip(parts, shard_sources, strict=True):
        if source == NO_SOURCE:
            pending.append(part)
            continue
        summaries.append(link_part(part, source, out, schema))
        written = pq.read_schema(out / f"{part}.parquet").remove_metadata()
        schema = written if len(written) > len(schema) else schema
    summaries += [link_part(part, None, out, schema) for part in pending]
    summaries.sort(key=lambda s: s["part"])
    write_json(summary_path, {"parts": summaries})
    return summaries


def write_key_ranges(summaries: Sequence[str], out: str) -> list[dict[str, Any]]:
    """Check that the shards' keys do not interleave; write their ranges (sorted)."""
    found = [s for path in summaries for s in json.loads(Path(path).read_text())["parts"]]
    ranges = sources.key_ranges(found)
    write_json(out, {"ranges": ranges})
    return ranges


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.data.existing", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="write the parts folder for data.shards")
    index.add_argument("patterns", nargs="+", help="data.shards (glob patterns)")
    index.add_argument("--out-dir", required=True, help="the parts folder to write")
    index.add_argument("--take", type=int, required=True, help="the first tars the run takes")
    index.add_argument("--shards-per-job", type=int, required=True)
    index.add_argument("--digest", required=True, help="files_digest of the planned tars")
    link = commands.add_parser("link", help="link one job's parts")
    link.add_argument("--part", nargs="+", required=True, help="part names")
    link.add_argument(
        "--source", nargs="+", required=True, help=f"tar per part ({NO_SOURCE}: none)"
    )
    link.add_argument("--out-dir", required=True, help="the shards folder")
    link.add_argument("--summary", required=True, help="the job's summary JSON")
    keys = commands.add_parser("keys", help="check and write the shards' key ranges")
    keys.add_argument("summaries", nargs="+", help="link summaries ({batch} with --each-part)")
    add_each_part_option(keys)
    keys.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "keys":
        write_key_ranges(expand_parts(args.summaries, args.each_part), args.out)
    elif args.command == "index":
        index_shards(args.patterns, args.out_dir, args.take, args.shards_per_job, args.digest)
    else:
        link_parts(args.part, args.source, args.out_dir, args.summary)


if __name__ == "__main__":
    run_cli(main)
