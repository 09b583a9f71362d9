"""Precomputed embeddings (data.embeddings, clip-retrieval's layout) in place of the embed jobs.

- ``locate`` (one job, unicom.embed.locate): every embedding row placed in the job batch of
  the shard whose key range holds its key.
- ``import`` (one job per batch of parts, where embed would run): the batch's rows joined to its
  shards' samples by key, written as ``embed/{part}.parquet`` exactly as embed writes it, with
  the named encoder's identity (``embed/encoder.json``) and ``precomputed`` naming the folder.
  Vectors are checked: the encoder's dimension, finite and not zero (else the sample is
  skipped, with the reason, as embed skips an undecodable image), unit length (else normalised
  once, and counted). Rows follow the shard table's order; a key given twice keeps its first
  row (file, row order).
- ``summary`` (one job, before k-means): every embedding row is ``matched``, a
  ``repeated_key``, ``no_sample`` (no such sample in the shards) or, with data.max_rows,
  ``outside_the_shards_taken``; every success of the shards is embedded or skipped with its
  reason. A share of ``no_sample`` above data.embeddings_max_unmatched stops the run.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unicom.cli import add_each_part_option, check_pairs, expand_parts, run_cli, setup_logging
from unicom.embed.locate import locate, read_batch
from unicom.embed.outputs import EmbedResult, result_table, write_skipped_csv
from unicom.errors import UnicomError
from unicom.formats import CAPTION_COLUMN, URL_COLUMN
from unicom.io import write_json, write_parquet
from unicom.vectors import l2_normalize

log = logging.getLogger("unicom.embed.precomputed")

# A float16 unit vector's norm is within ~1e-3 of 1; beyond this it was not normalised.
NORM_TOLERANCE = 1e-2
NO_EMBEDDING = "no precomputed embedding"
NON_FINITE = "non-finite precomputed embedding"
ZERO = "zero precomputed embedding"


# ---------------------------------------------------------------------------------------------
# Pure core


def check_vectors(
    image: np.ndarray, text: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str | None], int]:
    """(image, text, drop reason per row, rows normalised): rows with a non-finite or zero
    vector get a reason; rows off unit length by more than NORM_TOLERANCE are normalised
    (in float32); the others are returned as they are."""
    image, text = image.astype(np.float32), text.astype(np.float32)
    finite = np.isfinite(image).all(axis=1) & np.isfinite(text).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.stack([np.linalg.norm(image, axis=1), np.linalg.norm(text, axis=1)], axis=1)
    zero = finite & (norms == 0).any(axis=1)
    off = finite & ~zero & (np.abs(norms - 1) > NORM_TOLERANCE).any(axis=1)
    if off.any():
        image[off], text[off] = l2_normalize(image[off]), l2_normalize(text[off])
    reasons = [
        NON_FINITE if not f else ZERO if z else None for f, z in zip(finite, zero, strict=True)
    ]
    return image, text, reasons, int(off.sum())


def match_rows(
    successes: Sequence[str], located: pa.Table
) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """key -> (file, row) of each success that has an embedding row, and the counts of the
    part's embedding rows: matched, repeated_key (a later row of a key), no_sample."""
    wanted = set(successes)
    found: dict[str, tuple[int, int]] = {}
    counts = Counter({"matched": 0, "repeated_key": 0, "no_sample": 0})
    ordered = located.sort_by([("number", "ascending"), ("row", "ascending")])
    for key, number, row in zip(
        ordered["key"].to_pylist(),
        ordered["number"].to_pylist(),
        ordered["row"].to_pylist(),
        strict=True,
    ):
        if key not in wanted:
            counts["no_sample"] += 1
        elif key in found:
            counts["repeated_key"] += 1
        else:
            found[key] = (number, row)
            counts["matched"] += 1
    return found, dict(counts)


def gather(
    keys: Sequence[str], where: Mapping[str, tuple[int, int]], files: Mapping[int, Mapping]
) -> tuple[np.ndarray, np.ndarray]:
    """The image and text vectors of ``keys`` (each in ``where``), from the memory-mapped
    npy files, read file by file in row order."""
    dims = next(iter(files.values())) if files else {"image_dim": 0, "text_dim": 0}
    image = np.zeros((len(keys), dims["image_dim"]), np.float32)
    text = np.zeros((len(keys), dims["text_dim"]), np.float32)
    by_file: dict[int, list[tuple[int, int]]] = {}
    for i, key in enumerate(keys):
        number, row = where[key]
        by_file.setdefault(number, []).append((row, i))
    for number, pairs in by_file.items():
        pairs.sort()
        rows = np.array([row for row, _ in pairs], np.int64)
        slots = np.array([slot for _, slot in pairs], np.int64)
        image[slots] = np.load(files[number]["image"], mmap_mode="r")[rows]
        text[slots] = np.load(files[number]["text"], mmap_mode="r")[rows]
    return image, text


def check_encoder_dims(files: Mapping[int, Mapping], identity: Mapping[str, Any]) -> None:
    """Every embedding file holds vectors of the named encoder's dimensions."""
    for item in files.values():
        for tower in ("image", "text"):
            expected = identity[tower]["dim"]
            if item[f"{tower}_dim"] != expected:
                raise UnicomError(
                    f"config key data.embeddings: {item[tower]} holds {item[f'{tower}_dim']}-"
                    f"dimensional vectors, but the encoder embed.* names gives {expected}"
                )


# ---------------------------------------------------------------------------------------------
# import


def import_part(
    table_path: str, located: pa.Table, files: Mapping[int, Mapping], identity: Mapping
) -> tuple[pa.Table, list[tuple[str, str]], dict[str, int]]:
    """One part: its embed table, its skipped samples (key, reason) and its counts."""
    table = pq.read_table(table_path, columns=["key", "status", URL_COLUMN, CAPTION_COLUMN])
    table = table.filter(pc.equal(table["status"], "success"))
    successes = table["key"].to_pylist()
    where, counts = match_rows(successes, located)
    keep = [key in where for key in successes]
    kept = table.filter(pa.array(keep, pa.bool_()))
    keys = kept["key"].to_pylist()
    image, text, reasons, normalised = check_vectors(*gather(keys, where, files))
    good = np.array([reason is None for reason in reasons], bool)
    skipped = [(key, NO_EMBEDDING) for key, k in zip(successes, keep, strict=True) if not k]
    skipped += [(key, r) for key, r in zip(keys, reasons, strict=True) if r is not None]
    kept = kept.filter(pa.array(good))
    result = EmbedResult(
        keys=kept["key"].to_pylist(),
        captions=[c or "" for c in kept[CAPTION_COLUMN].to_pylist()],
        urls=kept[URL_COLUMN].to_pylist(),
        image_emb=image[good],
        text_emb=text[good],
        skipped=skipped,
    )
    reasons_count = Counter(reason for _, reason in skipped)
    counts.update(
        samples=len(successes),
        embedded=result.rows,
        normalised=normalised,
        **{
            reason.replace(" ", "_"): reasons_count[reason]
            for reason in (NO_EMBEDDING, NON_FINITE, ZERO)
        },
    )
    return result_table(result, identity), skipped, counts


def import_batch(
    batch: str,
    tables: Sequence[str],
    outs: Sequence[str],
    index_path: str,
    scatter_dir: str,
    encoder_path: str,
    skipped_path: str,
    stats_path: str,
) -> dict[str, Any]:
    """Write the embed files of one batch of parts from the located embedding rows."""
    check_pairs("--tables", tables, "--out", outs)
    index = json.loads(Path(index_path).read_text())
    identity = {**json.loads(Path(encoder_path).read_text()), "precomputed": index["folder"]}
    files = {item["number"]: item for item in index["files"]}
    check_encoder_dims(files, identity)
    pieces = []
    for number in index["batches"].get(batch, []):
        rows = read_batch(scatter_dir, number, batch)
        if rows is not None:
            pieces.append(
                rows.append_column("number", pa.array([number] * rows.num_rows, pa.int64()))
            )
    located = (
        pa.concat_tables(pieces)
        if pieces
        else pa.table({"part": pa.array([], pa.string()), "key": pa.array([], pa.string()),
                       "row": pa.array([], pa.int64()), "number": pa.array([], pa.int64())})
    )  # fmt: skip
    stats, skipped = {}, []
    for table_path, out in zip(tables, outs, strict=True):
        part = Path(out).name.removesuffix(".parquet")
        mine = located.filter(pc.equal(located["part"], part))
        embedded, part_skipped, counts = import_part(table_path, mine, files, identity)
        write_parquet(out, embedded)
        skipped += part_skipped
        stats[part] = counts
        log.info("part %s: %s", part, counts)
    write_skipped_csv(skipped_path, skipped)
    write_json(stats_path, {"batch": batch, "parts": stats})
    return stats


# ---------------------------------------------------------------------------------------------
# summary


def summarize(
    index: Mapping[str, Any], batches: Sequence[Mapping[str, Any]], max_unmatched: float
) -> dict[str, Any]:
    """Every embedding row and every shard success counted once; raises above the share of
    rows without a sample that data.embeddings_max_unmatched allows."""
    parts = Counter()
    for batch in batches:
        for counts in batch["parts"].values():
            parts.update(counts)
    placed = sum(item["placed"] for item in index["files"])
    outside = sum(item["outside"] for item in index["files"])
    found = parts["matched"] + parts["repeated_key"] + parts["no_sample"]
    if found != placed:
        raise RuntimeError(f"embedding accounting broken: {placed} rows placed, {found} counted")
    left_out = outside if index["shards_left_out"] else 0
    rows = {
        "matched": parts["matched"],
        "repeated_key": parts["repeated_key"],
        "no_sample": parts["no_sample"] + outside - left_out,
        "outside_the_shards_taken": left_out,
    }
    considered = index["rows"] - left_out
    share = rows["no_sample"] / considered if considered else 0.0
    shards = {key: parts[key] for key in ("samples", "embedded", "normalised")}
    shards.update(
        {reason: parts[reason.replace(" ", "_")] for reason in (NO_EMBEDDING, NON_FINITE, ZERO)}
    )
    summary = {"folder": index["folder"], "embedding_rows": rows, "no_sample_share": share,
               "max_unmatched": max_unmatched, "shard_samples": shards}  # fmt: skip
    log.info("precomputed embeddings: %s", json.dumps(summary))
    if share > max_unmatched:
        raise UnicomError(
            f"config key data.embeddings_max_unmatched: {rows['no_sample']} of {considered} "
            f"embedding rows ({share:.1%}) have no sample in data.shards, above "
            f"{max_unmatched:.1%}: are they the embeddings of these shards?"
        )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom.embed.precomputed", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    where = commands.add_parser("locate", help="place every embedding row in its job batch")
    where.add_argument("--key-ranges", required=True, help="shards/keys.json")
    where.add_argument("--parts-dir", required=True, help="the parts folder (manifest.json)")
    where.add_argument("--embeddings", required=True, help="data.embeddings")
    where.add_argument("--scatter-dir", required=True)
    where.add_argument("--out-index", required=True)
    one = commands.add_parser("import", help="write the embed files of one batch")
    one.add_argument("--batch", required=True)
    one.add_argument("--tables", nargs="+", required=True, help="shards/{part}.parquet")
    one.add_argument("--out", nargs="+", required=True, help="embed/{part}.parquet")
    one.add_argument("--index", required=True)
    one.add_argument("--scatter-dir", required=True)
    one.add_argument("--encoder", required=True, help="embed/encoder.json (the identity)")
    one.add_argument("--skipped", required=True)
    one.add_argument("--stats", required=True)
    total = commands.add_parser("summary", help="count every row; stop above the threshold")
    total.add_argument("stats", nargs="+", help="the import jobs' stats ({batch} with --each-part)")
    add_each_part_option(total)
    total.add_argument("--index", required=True)
    total.add_argument("--max-unmatched", type=float, required=True)
    total.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "locate":
        locate(args.key_ranges, args.parts_dir, args.embeddings, args.scatter_dir, args.out_index)
    elif args.command == "import":
        import_batch(args.batch, args.tables, args.out, args.index, args.scatter_dir,
                     args.encoder, args.skipped, args.stats)  # fmt: skip
    else:
        index = json.loads(Path(args.index).read_text())
        paths = expand_parts(args.stats, args.each_part)
        batches = [json.loads(Path(p).read_text()) for p in paths]
        write_json(args.out, summarize(index, batches, args.max_unmatched))


if __name__ == "__main__":
    run_cli(main)
