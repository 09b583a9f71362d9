"""``python -m unicom.encoders prefetch``: fetch and cache the configured encoder's weights (run
where there is internet, e.g. a login node, before compute jobs that have none)."""

from __future__ import annotations

import argparse
import os

from unicom.cli import run_cli, setup_logging
from unicom.encoders import prefetch
from unicom.images import to_rgb  # noqa: F401  (re-exported for train)
from unicom.io import write_json
from unicom.options import StageOptions

OPTIONS = StageOptions("embed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.encoders", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("prefetch", help="download/cache the configured encoder weights")
    fetch.add_argument("--identity-out", help="write the encoder identity JSON here")
    OPTIONS.add_to(fetch)
    args = parser.parse_args(argv)
    options = OPTIONS.from_args(args)
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    identity = prefetch(options)
    if args.identity_out:
        write_json(args.identity_out, identity)


if __name__ == "__main__":
    run_cli(main)
