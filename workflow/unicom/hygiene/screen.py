"""Screen the downloaded rows before clustering: metadata filters, then exact content duplicates.

One job over every part's shard table (``shards/{part}.parquet``), reading a few small columns
(status, sha256, sizes, the filtered columns) and never an image, so it does not hold back the
per-shard embed jobs, which run beside it. Output: the drops file ``screened.parquet`` (see
``unicom.drops``) and ``screen.json`` with the counts. k-means sampling and training
skip the dropped rows; they stay in the accounting.

- ``filters``: a successful row whose image-caption cosine (embed's ``clip_score``, read
  from ``embed/{part}.parquet`` only for this filter) is below ``clip_score_min``, whose
  original width or height is below ``min_width`` / ``min_height``, or that fails a column rule (``{column, op, value}`` on a ``data.extra_cols``
  column; a null value passes ``!=`` and ``not_in`` and fails the others), is ``filtered``.
- ``dedup.content``: among the rows that passed the filters, in global row order, a row whose
  image bytes (sha256) equal an earlier row's is ``duplicate_content`` with that row as twin.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from unicom import drops, duplicates, formats
from unicom.cli import (
    add_each_part_option,
    expand_parts,
    run_cli,
    setup_logging,
)
from unicom.config import section_options
from unicom.errors import UnicomError
from unicom.io import write_json
from unicom.options import StageOptions

log = logging.getLogger("unicom.hygiene.screen")
# What the screen job receives: dedup.content and the filters section.
OPTIONS = StageOptions(fields={"content": "dedup.content", "filters": "filters"})

OPERATORS = {
    "==": pc.equal,
    "!=": pc.not_equal,
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
}
NULL_PASSES = ("!=", "not_in")


def rule_name(rule: Mapping[str, Any]) -> str:
    return f"{rule['column']} {rule['op']} {rule['value']!r}"


def passes_rule(column: pa.Array, rule: Mapping[str, Any]) -> np.ndarray:
    """Mask of the values that pass one column rule (pure)."""
    op, value = rule["op"], rule["value"]
    if op in ("in", "not_in"):
        result = pc.is_in(column, value_set=pa.array(list(value)))
        result = pc.invert(result) if op == "not_in" else result
    else:
        result = OPERATORS[op](column, pa.scalar(value))
    filled = pc.fill_null(result, op in NULL_PASSES)
    return filled.to_numpy(zero_copy_only=False).astype(bool)


def filter_reasons(
    table: pa.Table, filters: Mapping[str, Any], clip_scores: pa.Table | None = None
) -> list[str | None]:
    """Per row of a shard table's successes: the first filter it fails, or None.
    ``clip_scores`` (key, clip_score): a success embed could not decode has none and passes."""
    reasons: list[str | None] = [None] * table.num_rows
    checks: list[tuple[str, np.ndarray]] = []
    if filters["clip_score_min"] is not None and clip_scores is not None:
        where = pc.index_in(table["key"], value_set=clip_scores["key"])
        scores = pc.take(clip_scores[formats.CLIP_SCORE_COLUMN], where)
        passed = pc.fill_null(pc.greater_equal(scores, filters["clip_score_min"]), True)
        checks.append((f"clip_score < {filters['clip_score_min']}", passed.to_numpy(False)))
    for key, column in (("min_width", "original_width"), ("min_height", "original_height")):
        if filters[key] is not None:
            values = pc.fill_null(table[column], 0).to_numpy()
            checks.append((f"{column} < {filters[key]}", values >= filters[key]))
    for rule in filters["columns"]:
        checks.append((rule_name(rule), passes_rule(table[rule["column"]], rule)))
    for name, passed in checks:
        for row in np.nonzero(~passed)[0]:
            if reasons[row] is None:
                reasons[row] = name
    return reasons


def read_clip_scores(path: str) -> pa.Table:
    try:
        return pq.read_table(path, columns=["key", formats.CLIP_SCORE_COLUMN])
    except (OSError, pa.ArrowInvalid, KeyError) as err:
        raise UnicomError(
            f"{path}: no {formats.CLIP_SCORE_COLUMN} column (embedded by one CLIP model? "
            f"{str(err).splitlines()[0]})"
        ) from None


def read_successes(path: str, columns: Sequence[str]) -> pa.Table:
    try:
        table = pq.read_table(path, columns=["key", "status", *columns])
    except (OSError, pa.ArrowInvalid) as err:
        raise UnicomError(f"{path}: not a shard table ({str(err).splitlines()[0]})") from None
    return table.filter(pc.equal(table["status"], "success"))


Passes = Callable[[str], Iterator[tuple[str, pa.Table, list[str | None]]]]


def content_duplicates(passing: Passes, survivors_total: int, work: str) -> tuple[list, dict]:
    """Drop rows (and statistics) of the rows passing the filters whose bytes repeat an
    earlier such row's; three more passes over the tables (hash, values, keys)."""

    def survivors(desc: str):
        for part, table, reasons in passing(desc):
            kept = pa.array([reason is None for reason in reasons], pa.bool_())
            yield part, table["key"].filter(kept), table["sha256"].filter(kept).combine_chunks()

    def replay():
        for _, _, digests in survivors("content"):
            yield duplicates.sha256_prefix(digests), digests

    found = duplicates.dedup_stream(replay, work, survivors_total)
    wanted = np.unique(np.concatenate([found.rows, found.firsts]))
    key_of: dict[int, tuple[str, str]] = {}
    offset = 0
    for part, keys, _ in survivors("keys") if len(wanted) else ():
        lo, hi = np.searchsorted(wanted, [offset, offset + len(keys)])
        for row in wanted[lo:hi].tolist():
            key_of[row] = (part, keys[row - offset].as_py())
        offset += len(keys)
    rows = [
        {
            "part": key_of[row][0],
            "key": key_of[row][1],
            "reason": drops.DUPLICATE_CONTENT,
            "twin": key_of[first][1],
            "twin_part": key_of[first][0],
        }
        for row, first in zip(found.rows.tolist(), found.firsts.tolist(), strict=True)
    ]
    return rows, {"candidate_rows": found.candidates, "hash_collisions": found.collisions}


def screen(
    tables: Sequence[str],
    out_drops: str,
    out_summary: str,
    options: Mapping[str, Any],
    work: str,
    embeddings: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the drops and the counts. Memory: the filtered rows and the duplicates, never the
    tables' rows (each pass re-reads the tables one at a time)."""
    started = time.monotonic()
    content_dedup = bool(options.get("content", False))
    filters = section_options("filters", options.get("filters"))
    columns = ["sha256", "original_width", "original_height"]
    columns += [r["column"] for r in filters["columns"] if r["column"] not in columns]
    scores = list(embeddings) if filters["clip_score_min"] is not None else []
    if scores and len(scores) != len(tables):
        raise UnicomError(f"{len(tables)} shard tables but {len(scores)} embedding files")

    def passing(desc: str):
        """(part, the table's successes, the filter each fails or None) per table."""
        for index, path in enumerate(tqdm(tables, desc=desc, unit="part", mininterval=5)):
            table = read_successes(path, columns)
            clip = read_clip_scores(scores[index]) if scores else None
            yield (
                Path(path).name.removesuffix(".parquet"),
                table,
                filter_reasons(table, filters, clip),
            )

    rows: list[dict[str, Any]] = []
    examined = 0
    for part, table, reasons in passing("filters"):
        examined += table.num_rows
        for key, reason in zip(table["key"].to_pylist(), reasons, strict=True):
            if reason is not None:
                rows.append({"part": part, "key": key, "reason": drops.FILTERED, "detail": reason})
    content: dict[str, Any] = {"enabled": content_dedup}
    if content_dedup:
        repeats, stats = content_duplicates(passing, examined - len(rows), work)
        content.update(stats)
        filtered = len(rows)
        rows += repeats
    else:
        filtered = len(rows)
    result = drops.table(rows)
    drops.write(out_drops, result)
    summary = {
        "successes_examined": examined,
        "dropped": drops.count_reasons(result),
        "filters": dict(Counter(r["detail"] for r in rows[:filtered])),
        "content_dedup": content,
        "kept": examined - result.num_rows,
        "seconds": round(time.monotonic() - started, 3),
    }
    write_json(out_summary, summary)
    log.info("screened %d successes: %s", examined, summary["dropped"])
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.hygiene.screen", description=__doc__)
    parser.add_argument("tables", nargs="+", help="shard tables (shards/{part}.parquet)")
    parser.add_argument("--out", required=True, help="drops Parquet to write")
    parser.add_argument("--out-summary", required=True, help="counts JSON to write")
    parser.add_argument("--work-dir", required=True, help="scratch folder (removed at the end)")
    parser.add_argument(
        "--embeddings", nargs="*", default=[], help="embed/{part}.parquet (clip_score_min only)"
    )
    add_each_part_option(parser)
    OPTIONS.add_to(parser)
    args = parser.parse_args(argv)
    options = OPTIONS.from_args(args)
    setup_logging()
    tables = expand_parts(args.tables, args.each_part)
    embeddings = expand_parts(args.embeddings, args.each_part)
    screen(tables, args.out, args.out_summary, options, args.work_dir, embeddings)


if __name__ == "__main__":
    run_cli(main)
