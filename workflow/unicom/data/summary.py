"""Gather the download jobs' summaries into one accounting of the whole URL list.

Every row of the URL list must be counted exactly once: as a success or under the reason it
was dropped. This stage refuses to write a summary whose counts do not add up, or one below
the success-rate floor: k-means and the screen wait for it.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from unicom.cli import expand_parts, run_cli, setup_logging
from unicom.data.accounting import check_success_rate
from unicom.errors import UnicomError
from unicom.formats import read_manifest
from unicom.io import write_json, write_text

log = logging.getLogger("unicom.data.summary")


def part_summaries(jobs: list[dict[str, Any]], expected_parts: list[str]) -> list[dict[str, Any]]:
    """The part summaries of every download job; each part of the manifest exactly once."""
    summaries = [part for job in jobs for part in job["parts"]]
    seen = Counter(s["part"] for s in summaries)
    twice = sorted(part for part, n in seen.items() if n > 1)
    missing = sorted(set(expected_parts) - set(seen))
    unknown = sorted(set(seen) - set(expected_parts))
    for problem, parts in (
        ("twice", twice),
        ("missing", missing),
        ("not in the manifest", unknown),
    ):
        if parts:
            raise UnicomError(f"download summaries: part(s) {', '.join(parts[:5])} {problem}")
    return summaries


def combine_summaries(summaries: list[dict[str, Any]], expected_rows: int | None) -> dict[str, Any]:
    """Sum per-part counts; check each part and the total add up."""
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    input_rows = 0
    for summary in summaries:
        part_total = sum(summary["counts"].values())
        if part_total != summary["input_rows"]:
            raise UnicomError(
                f"download part {summary['part']}: counts add up to {part_total}, "
                f"not to its {summary['input_rows']} input rows"
            )
        counts.update(summary["counts"])
        errors.update(summary.get("errors", {}))
        input_rows += summary["input_rows"]
    if expected_rows is not None and input_rows != expected_rows:
        raise UnicomError(
            f"download: the parts account for {input_rows} rows but the URL list has {expected_rows}"
        )
    return {
        "parts": len(summaries),
        "input_rows": input_rows,
        "counts": dict(sorted(counts.items())),
        "success_rate": counts["success"] / input_rows if input_rows else 0.0,
        "errors": dict(errors.most_common()),
    }


def summary_table(summaries: list[dict[str, Any]]) -> str:
    """One CSV line per part: its input rows and its count per status."""
    statuses = sorted({status for s in summaries for status in s["counts"]})
    lines = [",".join(["part", "input_rows", *statuses])]
    for s in sorted(summaries, key=lambda s: s["part"]):
        values = [str(s["counts"].get(status, 0)) for status in statuses]
        lines.append(",".join([s["part"], str(s["input_rows"]), *values]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.data.summary", description=__doc__)
    parser.add_argument(
        "summaries", nargs="+", help="download jobs' summary JSON files, or one with {batch} in it"
    )
    parser.add_argument("--parts-dir", required=True, help="split_urls output (has manifest.json)")
    parser.add_argument("--out", required=True, help="combined summary JSON")
    parser.add_argument("--out-table", required=True, help="per-part CSV table")
    parser.add_argument(
        "--min-success-rate", type=float, help="download.min_success_rate (none: no floor)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    manifest = read_manifest(args.parts_dir)
    paths = expand_parts(args.summaries, args.parts_dir)
    jobs = [json.loads(Path(p).read_text()) for p in tqdm(paths, unit="job", mininterval=5)]
    summaries = part_summaries(jobs, manifest["parts"])
    # Rows after data.max_rows never reached a part: counted here, so the summary still
    # accounts for every row of the URL list.
    left_out = manifest.get("rows_left_out", 0)
    # data.shards: no URL list; the rows are the shards' own, counted by the link jobs
    total = manifest["total_rows"]
    combined = combine_summaries(summaries, None if total is None else total - left_out)
    combined["url_list_rows"] = combined["input_rows"] + left_out if total is None else total
    combined["left_out_beyond_max_rows"] = left_out
    if "shards_left_out" in manifest:
        combined["shards_left_out"] = manifest["shards_left_out"]
    # Each download job checked its own parts; this sees the whole list (and summaries that a
    # run with another floor wrote: the floor is no param, so a new one reruns no download).
    where = "download (the whole URL list)"
    check_success_rate(combined["counts"], combined["errors"], args.min_success_rate, where)
    write_text(args.out_table, summary_table(summaries))
    write_json(args.out, combined)
    log.info(
        "%d rows in %d parts: %s", combined["input_rows"], combined["parts"], combined["counts"]
    )


if __name__ == "__main__":
    run_cli(main)
