"""Atomic file output and small shared I/O helpers.

Every stage writes through these helpers so that an interrupted job never leaves a
file that Snakemake (or a human) could mistake for a finished one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from unicom.errors import UnicomError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the result the permissions of an ordinary new file.
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_path
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp_path, path)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def parse_options_json(text: str) -> dict[str, Any]:
    """A stage's ``--options-json`` (its config section), checked to be a JSON object."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise UnicomError(f"--options-json is not valid JSON: {err}") from None
    if not isinstance(options, dict):
        raise UnicomError("--options-json must be a JSON object (a config section)")
    return options


def check_pairs(name: str, items: Sequence[str], other_name: str, others: Sequence[str]) -> None:
    """Two file lists given item by item (``--shard a b --out x y``) must be as long."""
    if len(items) != len(others):
        raise UnicomError(
            f"{len(items)} {name} but {len(others)} {other_name}: give one {other_name} per {name}"
        )


def batch_name(part: str, shards_per_job: int) -> str:
    """The job batch of a part: its name without the last log10(shards_per_job) digits
    (``00127`` is in batch ``0012`` with 10 shards per job, in ``00127`` with 1)."""
    digits = len(str(shards_per_job)) - 1
    return part[: len(part) - digits] if digits else part


def read_manifest(parts_dir: str | os.PathLike) -> dict[str, Any]:
    """split_urls' ``PARTS_DIR/manifest.json``, checked to list its parts."""
    manifest_path = Path(parts_dir) / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["parts"] = list(manifest["parts"])
        manifest["shards_per_job"] = int(manifest.get("shards_per_job", 1))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UnicomError(f"{manifest_path}: not a split_urls manifest ({err})") from None
    return manifest


FIELDS = ("{part}", "{batch}")


def add_each_part_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--each-part",
        metavar="PARTS_DIR",
        help="expand {part} (or {batch}) in the file arguments over the parts (job batches) of "
        "PARTS_DIR/manifest.json, split_urls' output: keeps the command short at 10,000s of shards",
    )


def expand_parts(paths: Sequence[str], parts_dir: str | None) -> list[str]:
    """``paths`` with each one holding ``{part}`` repeated for every part in manifest order
    (``{batch}``: for every job batch of parts).

    The workflow passes per-shard inputs this way because a shell command is one argument to
    ``bash -c``, and Linux caps one argument at 128 KiB (~3,500 file names).
    """
    templated = [p for p in paths if any(field in p for field in FIELDS)]
    if parts_dir is None:
        if templated:
            raise UnicomError(f"{templated[0]} holds {{part}} or {{batch}}: give --each-part")
        return list(paths)
    manifest = read_manifest(parts_dir)
    parts, per_job = manifest["parts"], manifest["shards_per_job"]
    names = {"{part}": parts, "{batch}": list(dict.fromkeys(batch_name(p, per_job) for p in parts))}
    expanded: list[str] = []
    for path in paths:
        field = next((f for f in FIELDS if f in path), None)
        if field is None:
            expanded.append(path)
        else:
            expanded.extend(path.replace(field, name) for name in names[field])
    return expanded


def setup_logging(verbose: bool = False) -> logging.Logger:
    """One log format for every stage (stderr, which the rule redirects to its log file)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return logging.getLogger("unicom")


def run_cli(main, argv: list[str] | None = None) -> None:
    """Run a stage's ``main``; a ``UnicomError`` becomes one clear line and exit code 2."""
    try:
        main(argv)
    except UnicomError as err:
        print(f"unicom: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
