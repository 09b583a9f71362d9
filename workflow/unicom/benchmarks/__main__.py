"""Check a benchmark's layout and print the sizes of its evaluation split.

python -m unicom.benchmarks cub /data/CUB_200_2011
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unicom.benchmarks import BENCHMARKS, load
from unicom.cli import run_cli, setup_logging
from unicom.io import write_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unicom.benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("path", nargs="?", help="dataset folder (or Parquet for openclipart)")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    parser.add_argument(
        "--no-check-files", action="store_true", help="do not check that every image exists"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    # A check by hand: a folder that is missing is an error, never "skipped".
    summary = load(args.name, args.path, check_files=not args.no_check_files).summary()
    print(" ".join(f"{key}={value}" for key, value in summary.items()))
    if args.out is not None:
        write_json(args.out, summary)


if __name__ == "__main__":
    run_cli(main)
