"""The offline demo pool: openclipart images with captions from their SVG metadata.

Two sub-commands:

- ``fetch``: make Debian's ``openclipart-png`` / ``openclipart-svg`` available without root, and
  record where they are in a JSON marker.
- ``fetch-fashion-mnist``: the same for ``dataset-fashion-mnist``, the evaluation set every run
  (demo or real) scores on unless the package is installed.
- ``pool``: turn the images into a LAION-style URL list (``file://`` URLs + captions) with a
  held-out split by image, stratified by category. Every image found is accounted for: train,
  held out, capped out, or dropped with a reason.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from unicom.cli import run_cli, setup_logging
from unicom.demo.debian import fetch_fashion_mnist, fetch_sources, read_source_marker
from unicom.demo.pool import build_pool, write_dropped
from unicom.errors import UnicomError
from unicom.io import write_json, write_parquet

log = logging.getLogger("unicom.demo.build")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser = argparse.ArgumentParser(
        prog="python -m unicom.demo.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser(
        "fetch", parents=[common], help="make the openclipart packages available"
    )
    fetch.add_argument("--resources-dir", type=Path, required=True)
    fetch.add_argument("--out", type=Path, required=True, help="JSON marker to write")
    fetch.add_argument(
        "--system-root", type=Path, default=Path("/"), help="where installed packages live"
    )
    fetch.add_argument(
        "--no-download", action="store_true", help="never call apt-get; fail if not found"
    )

    fashion = sub.add_parser(
        "fetch-fashion-mnist",
        parents=[common],
        help="make Debian's dataset-fashion-mnist available under --resources-dir",
    )
    fashion.add_argument("--resources-dir", type=Path, required=True)
    fashion.add_argument("--out", type=Path, required=True, help="JSON marker to write")

    pool = sub.add_parser("pool", parents=[common], help="build the URL list and held-out split")
    source = pool.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", type=Path, help="marker written by fetch")
    source.add_argument("--image-dir", type=Path, help="folder with one subfolder per category")
    pool.add_argument("--out-urls", type=Path, required=True)
    pool.add_argument("--out-heldout", type=Path, required=True)
    pool.add_argument("--out-dropped", type=Path, required=True)
    pool.add_argument("--out-summary", type=Path, required=True)
    pool.add_argument("--heldout-fraction", type=float, default=0.1)
    pool.add_argument("--max-images", type=int, default=None)
    pool.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    started = time.perf_counter()
    if args.command == "fetch":
        marker = fetch_sources(args.resources_dir, args.system_root, not args.no_download)
        write_json(args.out, marker)
        log.info(
            "%d PNGs at %s (source: %s)", marker["num_png"], marker["png_root"], marker["source"]
        )
        return
    if args.command == "fetch-fashion-mnist":
        marker = fetch_fashion_mnist(args.resources_dir, allow_download=True)
        write_json(args.out, marker)
        log.info("Fashion-MNIST at %s", marker["fashion_mnist_dir"])
        return

    if args.source is not None:
        image_root, svg_root = read_source_marker(args.source)
    else:
        if not args.image_dir.is_dir():
            raise UnicomError(f"--image-dir {args.image_dir} is not a folder")
        image_root, svg_root = args.image_dir, None
    result = build_pool(image_root, svg_root, args.heldout_fraction, args.max_images, args.seed)
    result.summary["seconds"] = round(time.perf_counter() - started, 2)
    write_parquet(args.out_urls, result.train)
    write_parquet(args.out_heldout, result.heldout)
    write_dropped(args.out_dropped, result.dropped)
    write_json(args.out_summary, result.summary)
    s = result.summary
    log.info(
        "found %d: train %d, held out %d, capped out %d, dropped %d %s (%.1f s)",
        s["found"],
        s["train"],
        s["heldout"],
        s["capped_out"],
        s["dropped_total"],
        s["dropped"],
        s["seconds"],
    )


if __name__ == "__main__":
    run_cli(main)
