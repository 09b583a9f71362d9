import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicom import formats
from unicom.cluster.assign import assign_file
from unicom.cluster.diagnostics import diagnostics, pick_clusters, pick_members, read_tar_samples
from unicom.cluster.kmeans import cluster_files
from unicom.cluster.report import AssignmentStats, main, read_stats, size_summary
from unicom.embed.fuse import fuse_embeddings
from unicom.errors import UnicomError
from unicom.synthetic import image_bytes, sample_members, write_tar
from unicom.vectors import save_centroids

from helpers.vectors import blobs, unit, write_fused

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CATEGORIES = ["boats", "cats", "trees"]
KMEANS = {"k": 3, "niter": 10, "seed": 0, "init": "kmeans++"}


def empty_stats(k):
    from unicom.cluster.report import MARGIN_BINS, SIM_BINS

    return AssignmentStats(
        k,
        np.zeros(k, np.int64),
        np.zeros(len(SIM_BINS) - 1, np.int64),
        np.zeros(len(MARGIN_BINS) - 1, np.int64),
        0.0,
        0.0,
    )


def test_size_summary_counts_small_and_empty_clusters():
    from unicom.cluster.report import accumulate

    stats = empty_stats(5)
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1 + [4] * 6)
    sim = np.full(len(labels), 0.8, np.float32)
    accumulate(stats, labels, sim, sim - 0.1)
    summary = size_summary(stats, min_cluster_size=4)
    assert summary["samples"] == 20 and summary["k"] == 5
    assert summary["size"] == {"min": 0, "median": 3.0, "mean": 4.0, "max": 10}
    assert summary["empty_clusters"] == 1
    assert summary["clusters_below_min_size"] == 3  # sizes 3, 1 and 0
    assert summary["samples_in_clusters_below_min_size"] == 4
    assert summary["sim"]["mean"] == pytest.approx(0.8, abs=1e-6)
    assert summary["sim"]["p50"] == pytest.approx(0.8, abs=2e-3)
    assert summary["margin"]["mean"] == pytest.approx(0.1, abs=1e-6)


def test_pick_clusters_and_members_are_seeded_and_skip_empty_clusters():
    sizes = np.array([0, 5, 0, 7, 2, 9])
    chosen = pick_clusters(sizes, 3, seed=1)
    assert len(chosen) == 3 and set(chosen) <= {1, 3, 4, 5}
    assert list(chosen) == sorted(chosen) == list(pick_clusters(sizes, 3, seed=1))
    assert list(pick_clusters(sizes, 10, seed=0)) == [1, 3, 4, 5]
    members = {1: list("abcdefg"), 3: ["x"]}
    picked = pick_members(members, 3, seed=0)
    assert len(picked[1]) == 3 and set(picked[1]) <= set("abcdefg") and picked[3] == ["x"]
    assert picked == pick_members(members, 3, seed=0)


# ---------------------------------------------------------------------------------------------
# A tiny end-to-end dataset: shards (tar + table), embeddings, fused, centroids, assignments.


def make_run(root, with_labels=True):
    """2 shards x 12 samples of 3 categories; images cluster by category, captions do not."""
    image, truth = blobs(3, 8, dim=16, noise=0.01, seed=1)
    text = unit(np.random.default_rng(2).normal(size=(24, 12)))
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    paths = {name: [] for name in ("tars", "tables", "embeddings", "fused", "assignments")}
    for p, rows in enumerate((slice(0, 12), slice(12, 24))):
        part = formats.part_name(p)
        keys = [formats.global_key(part, f"{i:09d}") for i in range(12)]
        labels = [CATEGORIES[t] for t in truth[rows]]
        tar_path = root / f"shards/{part}.tar"
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        members = []
        for key, label, t in zip(keys, labels, truth[rows], strict=True):
            caption = f"a picture of {label} number {key[-2:]}"
            members += sample_members(key, image_bytes(colours[t], size=(24, 24)), caption)
        write_tar(tar_path, members)
        failed = formats.global_key(part, "000000012")  # a row that never downloaded
        columns = {"key": keys + [failed], "status": ["success"] * 12 + ["failed_to_download"]}
        if with_labels:
            columns["category"] = labels + [None]
        pq.write_table(pa.table(columns), root / f"shards/{part}.parquet")
        embed = root / f"embed/{part}.parquet"
        embed.parent.mkdir(exist_ok=True)
        pq.write_table(
            pa.table(
                {
                    "key": keys,
                    "image_emb": formats.embedding_array(image[rows]),
                    "text_emb": formats.embedding_array(text[rows]),
                }
            ),
            embed,
        )
        fused = root / f"fused/{part}.parquet"
        fused.parent.mkdir(exist_ok=True)
        write_fused(fused, fuse_embeddings(image[rows], text[rows], "concat"), part)
        for name, path in (
            ("tars", tar_path),
            ("tables", root / f"shards/{part}.parquet"),
            ("embeddings", embed),
            ("fused", fused),
        ):
            paths[name].append(str(path))
    centroids, _ = cluster_files(paths["fused"], KMEANS)
    save_centroids(root / "centroids.npy", centroids)
    for fused in paths["fused"]:
        out = root / "assign" / fused.rsplit("/", 1)[1]
        assign_file(fused, str(root / "centroids.npy"), str(out), {})
        paths["assignments"].append(str(out))
    return paths


def run_diagnostics(root, paths, label_columns=("category",)):
    options = {"label_columns": list(label_columns), "grid_clusters": 2, "grid_images": 3}
    outputs = [str(root / "clusters" / name) for name in ("grid.png", "agreement.json", "a.png")]
    report = diagnostics(
        paths["assignments"],
        paths["tars"],
        paths["tables"],
        paths["embeddings"],
        KMEANS,
        options,
        *outputs,
    )
    return report, outputs


def test_diagnostics_score_three_clusterings_and_draw_the_grid(tmp_path):
    paths = make_run(tmp_path)
    report, (grid, agreement, chart) = run_diagnostics(tmp_path, paths)
    assert json.loads(open(agreement).read()) == report
    clusterings = report["clusterings"]
    assert list(clusterings) == ["image", "text", "fused (concat)"]
    # Images carry the categories, captions do not: the wiring of each modality shows.
    assert clusterings["image"]["category"]["nmi"] == 1.0
    assert clusterings["image"]["category"]["ari"] == 1.0
    assert clusterings["text"]["category"]["nmi"] < 0.6
    for scores in clusterings.values():
        assert scores["samples"] == 24 and scores["category"]["labelled"] == 24
        assert scores["category"]["classes"] == 3
        assert 0 <= scores["category"]["nmi"] <= 1
    assert report["best_by_nmi"]["category"] in ("image", "fused (concat)")
    for png in (grid, chart):
        assert open(png, "rb").read(8) == PNG_MAGIC


def test_diagnostics_without_labels_writes_a_note(tmp_path):
    paths = make_run(tmp_path, with_labels=False)
    report, (grid, agreement, chart) = run_diagnostics(tmp_path, paths)
    assert report["clusterings"] == {} and report["note"].startswith("no labels")
    assert "data.extra_cols" in report["note"]
    assert open(grid, "rb").read(8) == PNG_MAGIC and open(chart, "rb").read(8) == PNG_MAGIC


def test_read_tar_samples_names_the_tar_of_a_missing_key(tmp_path):
    tar_path = tmp_path / "00000.tar"
    write_tar(tar_path, sample_members("00000_000000001", image_bytes((1, 2, 3)), "a caption"))
    samples = read_tar_samples(str(tar_path), ["00000_000000001"])
    assert samples["00000_000000001"][1] == "a caption"
    with pytest.raises(UnicomError, match="00000.tar: no sample with key '00000_000000002'"):
        read_tar_samples(str(tar_path), ["00000_000000002"])


def test_sizes_cli_and_mixed_centroids(tmp_path):
    paths = make_run(tmp_path)
    out_json, out_png = tmp_path / "clusters/sizes.json", tmp_path / "clusters/sizes.png"
    main(
        [
            *paths["assignments"],
            "--min-cluster-size",
            "5",
            "--out-json",
            str(out_json),
            "--out-png",
            str(out_png),
        ]
    )
    summary = json.loads(out_json.read_text())
    assert summary["samples"] == 24 and summary["k"] == 3 and summary["size"]["max"] <= 24
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    # An assignment from other centroids must not be mixed in.
    save_centroids(tmp_path / "other.npy", unit(np.random.default_rng(9).normal(size=(3, 28))))
    assign_file(paths["fused"][1], str(tmp_path / "other.npy"), paths["assignments"][1], {})
    with pytest.raises(UnicomError, match="00001.parquet: assigned with other centroids"):
        read_stats(paths["assignments"])
