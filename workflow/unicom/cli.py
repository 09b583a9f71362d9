"""Command-line plumbing shared by every stage: logging, errors as one line, option parsing,
the ``--each-part`` expansion of per-shard file arguments, and the watchdog that ends a stage
with the Snakemake process that started it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from unicom.errors import UnicomError
from unicom.formats import batch_name, read_manifest
from unicom.watchdog import watch


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


FIELDS = ("{part}", "{batch}")


def add_each_part_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--each-part",
        metavar="PARTS_DIR",
        help="expand {part} (or {batch}) in the file arguments over the parts (job batches) of "
        "PARTS_DIR/manifest.json, split_urls' output: keeps the command short at 10,000s of shards",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a stage that embeds images with a frozen model (evaluate, linear_probe):
    which model (unicom.embedders.load_embedder), how to build the base one, and the cores."""
    parser.add_argument("--model", required=True, help="'base' or a unicom.train export folder")
    parser.add_argument(
        "--embed-options-json",
        required=True,
        metavar="JSON",
        help="the embed config section, for --model base (keys: python -m unicom.embed.embed -h)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (the job's cores)")


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
    """Run a stage's ``main``; a ``UnicomError`` becomes one clear line and exit code 2.
    Under Snakemake, the stage ends when the Snakemake process does (``unicom.watchdog``)."""
    try:
        watch()
        main(argv)
    except UnicomError as err:
        print(f"unicom: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
