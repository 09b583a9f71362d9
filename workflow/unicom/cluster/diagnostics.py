"""Look at the pseudo-classes: an image grid per cluster, and agreement with known labels.

- ``grid.png``: a few seeded random clusters, a few seeded random members each, images and
  captions read from the webdataset shards.
- ``agreement.json`` (+ ``agreement.png``): NMI and ARI of three clusterings against the
  label columns the shard tables carry (the demo's ``category``/``subcategory``): k-means on
  image embeddings only, on text embeddings only, and the configured fusion (the pipeline's
  assignments). The same seeded k-means (the config's ``kmeans`` section) runs on each, so the
  paper's "joint clustering is best" claim can be checked. Without a label column (real
  LAION) the JSON says so and no extra k-means runs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tqdm import tqdm

from unicom import formats
from unicom.cli import (
    add_each_part_option,
    expand_parts,
    parse_options_json,
    run_cli,
    setup_logging,
)
from unicom.cluster.kmeans import cluster_files
from unicom.cluster.plots import plot_agreement, plot_grid, plot_note
from unicom.cluster.report import check_same_centroids
from unicom.config import section_options
from unicom.errors import UnicomError
from unicom.io import write_json
from unicom.options import StageOptions
from unicom.shards import read_samples, sample_image
from unicom.vectors import centroid_index, check_finite, l2_normalize, search_centroids

log = logging.getLogger("unicom.cluster.diagnostics")
OPTIONS = StageOptions("assign.diagnostics")

# Embedding columns of the embed stage clustered on their own for the comparison.
MODALITY_COLUMNS = {"image": "image_emb", "text": "text_emb"}


# ---------------------------------------------------------------------------------------------
# Pure core


def by_part(paths: Sequence[str], what: str) -> dict[str, str]:
    """Part name (file stem) -> path; a part listed twice is an error."""
    parts: dict[str, str] = {}
    for path in paths:
        part = Path(path).stem
        if part in parts:
            raise UnicomError(f"{path}: part {part} given twice as {what}")
        parts[part] = str(path)
    return parts


def pick_clusters(sizes: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Up to ``count`` distinct non-empty clusters, seeded, sorted."""
    candidates = np.flatnonzero(sizes > 0)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False))


def pick_members(members: Mapping[int, Sequence[Any]], count: int, seed: int) -> dict[int, list]:
    """Up to ``count`` seeded random members of each cluster (in their original order)."""
    picked = {}
    for cluster in sorted(members):
        rng = np.random.default_rng([seed, int(cluster)])
        pool = members[cluster]
        chosen = np.sort(rng.choice(len(pool), size=min(count, len(pool)), replace=False))
        picked[cluster] = [pool[i] for i in chosen]
    return picked


def agreement_scores(pseudo: Sequence[int], truth: Sequence[Any]) -> dict[str, float]:
    """NMI and ARI of pseudo-labels against ground-truth labels (sklearn)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {
        "nmi": round(float(normalized_mutual_info_score(truth, pseudo)), 4),
        "ari": round(float(adjusted_rand_score(truth, pseudo)), 4),
    }


def agreement_report(
    clusterings: Mapping[str, pd.DataFrame], labels: pd.DataFrame, label_columns: Sequence[str]
) -> dict[str, Any]:
    """Scores of each clustering (``key``, ``label``) on the keys that carry each label column."""
    report: dict[str, Any] = {}
    for name, assignment in clusterings.items():
        joined = assignment.merge(labels, on="key", how="left")
        scores: dict[str, Any] = {
            "samples": len(joined),
            "clusters_used": int(joined["label"].nunique()),
        }
        for column in label_columns:
            known = joined[joined[column].notna()]
            scores[column] = {
                **agreement_scores(known["label"].to_numpy(), known[column].to_numpy()),
                "labelled": len(known),
                "unlabelled": len(joined) - len(known),
                "classes": int(known[column].nunique()),
            }
        report[name] = scores
    return report


# ---------------------------------------------------------------------------------------------
# Inputs


def read_assignments(paths: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Part -> (key, label) table of each assignment file."""
    return {
        part: pq.read_table(path, columns=["key", "label"]).to_pandas()
        for part, path in by_part(paths, "assignment").items()
    }


def read_labels(
    table_paths: Sequence[str], label_columns: Sequence[str]
) -> tuple[pd.DataFrame | None, list[str], str | None]:
    """Key + label columns of the successfully downloaded rows of every shard table.

    Returns (labels, the columns found, a note when none is); a column missing from some
    tables but present in others is an error naming the file.
    """
    found = [c for c in label_columns if c in pq.read_schema(table_paths[0]).names]
    frames = []
    for path in table_paths:
        names = pq.read_schema(path).names
        for column in ("key", "status"):
            if column not in names:
                raise UnicomError(f"{path}: no column '{column}' (not a download shard table)")
        missing = [c for c in found if c not in names]
        if missing:
            raise UnicomError(
                f"{path}: no label column '{missing[0]}' (other shard tables have it)"
            )
        if not found:
            continue
        table = pq.read_table(path, columns=["key", "status", *found]).to_pandas()
        frames.append(table[table["status"] == "success"].drop(columns="status"))
    if not found:
        note = (
            f"no labels: the shard tables have none of the columns {list(label_columns)} "
            "(set data.extra_cols to carry them through download); agreement not computed"
        )
        return None, [], note
    labels = pd.concat(frames, ignore_index=True)
    usable = [c for c in found if labels[c].notna().any()]
    if not usable:
        return None, [], f"no labels: the label columns {found} are empty in every shard table"
    return labels, usable, None


def read_tar_samples(tar_path: str, keys: Sequence[str]) -> dict[str, tuple[bytes, str]]:
    """Image bytes and caption of ``keys`` from one webdataset shard."""
    samples = {}
    for key, sample in read_samples(tar_path, keys).items():
        image = sample_image(sample)
        if image is None:
            raise UnicomError(f"{tar_path}: no image member for key {key}")
        caption = sample.files.get("txt", b"").decode("utf-8", errors="replace")
        samples[key] = (image[1], caption)
    return samples


def cluster_modality(
    embed_paths: Sequence[str],
    column: str,
    kmeans_options: Mapping[str, Any],
    threads: int | None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The configured k-means on one embedding column; every row's nearest centroid."""
    centroids, stats = cluster_files(embed_paths, kmeans_options, column, threads)
    index = centroid_index(centroids, stats["gpu"])
    frames = []
    for path in embed_paths:
        table = pq.read_table(path, columns=["key", column])
        vectors = formats.column_to_numpy(table[column])
        check_finite(vectors, path, lambda i, keys=table["key"]: f"key {keys[i]}")
        _, labels = search_centroids(index, l2_normalize(vectors))
        frames.append(pd.DataFrame({"key": table["key"].to_pylist(), "label": labels[:, 0]}))
    summary = {k: stats[k] for k in ("k", "d", "sample_size", "mean_cosine_to_centroid")}
    return pd.concat(frames, ignore_index=True), summary


# ---------------------------------------------------------------------------------------------
# Plots


# ---------------------------------------------------------------------------------------------
# Driver


def build_grid(
    assignment_paths: Mapping[str, str],
    tars: Mapping[str, str],
    k: int,
    options: Mapping[str, Any],
) -> list[tuple[int, int, list[tuple[bytes, str]]]]:
    """Seeded clusters and members, with their images and captions from the shards.

    Streams the assignment files twice (labels, then keys of the chosen clusters), so that
    memory stays small at LAION scale.
    """
    sizes = np.zeros(k, np.int64)
    for path in assignment_paths.values():
        labels = pq.read_table(path, columns=["label"])["label"].to_numpy()
        sizes += np.bincount(labels, minlength=k)
    clusters = pick_clusters(sizes, options["grid_clusters"], options["seed"])
    members: dict[int, list[tuple[str, str]]] = {int(c): [] for c in clusters}
    for part, path in assignment_paths.items():
        table = pq.read_table(path, columns=["key", "label"])
        labels = table["label"].to_numpy()
        for row in np.flatnonzero(np.isin(labels, clusters)):
            members[int(labels[row])].append((part, table["key"][int(row)].as_py()))
    picked = pick_members(members, options["grid_images"], options["seed"])
    wanted: dict[str, list[str]] = {}
    for entries in picked.values():
        for part, key in entries:
            wanted.setdefault(part, []).append(key)
    samples = {}
    for part, keys in tqdm(sorted(wanted.items()), desc="grid shards", unit="tar", mininterval=5):
        if part not in tars:
            raise UnicomError(f"no shard tar given for part {part}")
        samples.update(read_tar_samples(tars[part], keys))
    return [
        (cluster, int(sizes[cluster]), [samples[key] for _, key in picked[cluster]])
        for cluster in picked
    ]


def score_clusterings(
    assignment_paths: Sequence[str],
    embed_paths: Sequence[str],
    fused_name: str,
    identity: Mapping[str, Any],
    labels: pd.DataFrame,
    label_columns: Sequence[str],
    kmeans_options: Mapping[str, Any],
    threads: int | None,
) -> dict[str, Any]:
    """Agreement of the image-only, text-only and fused clusterings with the labels."""
    # The comparison clusterings run wherever this job runs (CPU unless it has a GPU).
    same_kmeans = {**kmeans_options, "gpu": "auto"}
    clusterings, details = {}, {}
    for name, column in MODALITY_COLUMNS.items():
        log.info("k-means on %s embeddings (%s) for the comparison", name, column)
        clusterings[name], details[name] = cluster_modality(
            embed_paths, column, same_kmeans, threads
        )
    assignments = read_assignments(assignment_paths)
    clusterings[fused_name] = pd.concat(assignments.values(), ignore_index=True)
    details[fused_name] = {"k": identity["k"], "d": identity["d"], "source": "assign stage"}
    scores = agreement_report(clusterings, labels, label_columns)
    for name, detail in details.items():
        scores[name]["kmeans"] = detail
    return scores


def diagnostics(
    assignment_paths: Sequence[str],
    tar_paths: Sequence[str],
    table_paths: Sequence[str],
    embed_paths: Sequence[str],
    kmeans_options: Mapping[str, Any],
    options: Mapping[str, Any],
    out_grid: str,
    out_agreement: str,
    out_agreement_png: str,
    threads: int | None = None,
) -> dict[str, Any]:
    options = section_options("assign.diagnostics", options)
    identity = check_same_centroids(list(assignment_paths))
    parts = by_part(assignment_paths, "assignment")
    grid = build_grid(parts, by_part(tar_paths, "shard tar"), identity["k"], options)
    plot_grid(grid, options["grid_images"], out_grid)

    fusion = identity.get("fusion") or {}
    fused_name = f"fused ({fusion['mode']})" if "mode" in fusion else "fused"
    labels, label_columns, note = read_labels(table_paths, options["label_columns"])
    report: dict[str, Any] = {
        "k": identity["k"],
        "label_columns": label_columns,
        "fusion": fusion,
        "clusterings": {},
    }
    if labels is None:
        report["note"] = note
        plot_note(note, out_agreement_png)
    else:
        report["clusterings"] = score_clusterings(
            assignment_paths, embed_paths, fused_name, identity, labels, label_columns,
            kmeans_options, threads,
        )  # fmt: skip
        report["best_by_nmi"] = {
            column: max(
                report["clusterings"], key=lambda n: report["clusterings"][n][column]["nmi"]
            )
            for column in label_columns
        }
        plot_agreement(report["clusterings"], label_columns, out_agreement_png)
    write_json(out_agreement, report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unicom.cluster.diagnostics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--assignments", nargs="+", required=True, help="assign/{part}.parquet")
    parser.add_argument("--shards", nargs="+", required=True, help="shards/{part}.tar")
    parser.add_argument("--shard-tables", nargs="+", required=True, help="shards/{part}.parquet")
    parser.add_argument("--embeddings", nargs="+", required=True, help="embed/{part}.parquet")
    parser.add_argument(
        "--kmeans-options-json",
        required=True,
        metavar="JSON",
        help="the kmeans section (keys: python -m unicom.cluster.kmeans -h)",
    )
    parser.add_argument("--out-grid", required=True, help="grid.png to write")
    parser.add_argument("--out-agreement", required=True, help="agreement.json to write")
    parser.add_argument("--out-agreement-png", required=True, help="agreement.png to write")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for faiss")
    add_each_part_option(parser)
    OPTIONS.add_to(parser)
    args = parser.parse_args(argv)
    options = OPTIONS.from_args(args)
    setup_logging()
    report = diagnostics(
        expand_parts(args.assignments, args.each_part),
        expand_parts(args.shards, args.each_part),
        expand_parts(args.shard_tables, args.each_part),
        expand_parts(args.embeddings, args.each_part),
        parse_options_json(args.kmeans_options_json),
        options,
        args.out_grid,
        args.out_agreement,
        args.out_agreement_png,
        args.threads,
    )
    if report["clusterings"]:
        for name, scores in report["clusterings"].items():
            log.info("%s: %s", name, {c: scores[c] for c in report["label_columns"]})
    else:
        log.info("%s", report["note"])


if __name__ == "__main__":
    run_cli(main)
