import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import normalized_mutual_info_score

from unicom import formats
from unicom.cli import run_cli
from unicom.cluster.kmeans import allocate_subclusters, cluster_files, main
from unicom.cluster.sample import sample_plan
from unicom.vectors import inspect_files, read_rows

from helpers.vectors import blobs, split_files, unit, write_fused


def test_recovers_well_separated_blobs(tmp_path):
    vectors, truth = blobs(8, 60, noise=0.005)
    paths = split_files(tmp_path, vectors)
    centroids, stats = cluster_files(paths, {"k": 8, "niter": 10, "init": "kmeans++"})
    assert centroids.shape == (8, 32) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    labels = np.argmax(vectors @ centroids.T, axis=1)
    assert normalized_mutual_info_score(truth, labels) > 0.99
    assert stats["sample_size"] == stats["vectors"] == 480 and stats["files"] == 3
    assert 1 <= len(stats["iterations"]) <= 10 and stats["gpu"] is False  # faiss stops early
    assert stats["sample_cluster_sizes"]["empty"] == 0
    assert stats["mean_cosine_to_centroid"] > 0.95


def test_same_seed_same_centroids_other_seed_other_centroids(tmp_path):
    rng = np.random.default_rng(1)
    paths = split_files(tmp_path, unit(rng.normal(size=(400, 16))))
    first, _ = cluster_files(paths, {"k": 10, "niter": 5, "seed": 3})
    again, _ = cluster_files(paths, {"k": 10, "niter": 5, "seed": 3})
    other, _ = cluster_files(paths, {"k": 10, "niter": 5, "seed": 4})
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_sample_plan_is_capped_seeded_and_sorted():
    rows = [1000, 10, 5000, 1]
    plan = sample_plan(rows, 600, seed=7)
    assert sum(len(p) for p in plan) == 600
    for indices, n in zip(plan, rows, strict=True):
        assert np.all(np.diff(indices) > 0) and (len(indices) == 0 or indices[-1] < n)
    assert all(np.array_equal(a, b) for a, b in zip(plan, sample_plan(rows, 600, 7), strict=True))
    assert not all(
        np.array_equal(a, b) for a, b in zip(plan, sample_plan(rows, 600, 8), strict=True)
    )
    # Roughly proportional to the file sizes (a uniform sample of all rows).
    assert 60 < len(plan[0]) < 140 and 440 < len(plan[2]) < 560
    everything = sample_plan([5, 3], 100, seed=0)
    assert [list(p) for p in everything] == [[0, 1, 2, 3, 4], [0, 1, 2]]


def test_training_reads_at_most_k_times_max_points_per_centroid(tmp_path):
    vectors, _ = blobs(4, 100, dim=8)
    paths = split_files(tmp_path, vectors, parts=2)
    _, stats = cluster_files(paths, {"k": 4, "niter": 3, "max_points_per_centroid": 10})
    assert stats["sample_size"] == stats["sample_cap"] == 40 and stats["vectors"] == 400


def test_read_rows_reads_the_requested_rows_across_row_groups(tmp_path):
    vectors, _ = blobs(2, 50, dim=4)
    path = tmp_path / "f.parquet"
    write_fused(path, vectors, row_group_size=7)
    assert pq.ParquetFile(path).num_row_groups == 15
    indices = np.array([0, 6, 7, 8, 50, 99])
    expected = formats.column_to_numpy(pq.read_table(path)["emb"])[indices]
    np.testing.assert_array_equal(read_rows(str(path), "emb", indices), expected)


def test_allocate_subclusters_sums_to_k_and_respects_sizes():
    sizes = np.array([100, 0, 3, 1, 50, 46])
    for k in (5, 6, 20, 200):
        alloc = allocate_subclusters(sizes, k)
        assert alloc.sum() == k
        assert np.all(alloc <= sizes) and np.all(alloc[sizes > 0] >= 1) and alloc[1] == 0
    assert list(allocate_subclusters(sizes, 200)) == list(sizes)
    assert allocate_subclusters(np.array([90, 10]), 10).tolist() == [9, 1]


def test_two_level_recovers_blobs_with_k_centroids(tmp_path):
    vectors, truth = blobs(12, 40, noise=0.005)
    paths = split_files(tmp_path, vectors)
    centroids, stats = cluster_files(
        paths, {"k": 12, "niter": 10, "two_level": True, "coarse_k": 3, "init": "kmeans++"}
    )
    assert centroids.shape == (12, 32)
    assert stats["two_level"]["coarse_k"] == 3
    labels = np.argmax(vectors @ centroids.T, axis=1)
    assert normalized_mutual_info_score(truth, labels) > 0.95


def test_cli_writes_centroids_and_stats_and_keeps_stdout_clean(tmp_path, capfd):
    vectors, _ = blobs(4, 30, dim=8)
    paths = split_files(tmp_path, vectors, parts=2)
    out_c, out_s = tmp_path / "km" / "centroids.npy", tmp_path / "km" / "kmeans.json"
    options = json.dumps({"k": 4, "niter": 4, "seed": 0, "gpu": "auto"})
    main(
        [
            *paths,
            "--out-centroids",
            str(out_c),
            "--out-stats",
            str(out_s),
            "--options-json",
            options,
            "--threads",
            "1",
        ]
    )
    captured = capfd.readouterr()
    assert captured.out == ""  # faiss's verbose printf goes to stderr (the job log)
    assert "Iteration 0" in captured.err and "objective=" in captured.err
    centroids = np.load(out_c)
    assert centroids.shape == (4, 8) and centroids.dtype == np.float32
    stats = json.loads(out_s.read_text())
    assert stats["k"] == 4 and stats["d"] == 8 and stats["sample_size"] == 120
    assert 1 <= len(stats["iterations"]) <= 4 and stats["faiss_version"]
    assert sorted(p.name for p in out_c.parent.iterdir()) == ["centroids.npy", "kmeans.json"]


def bad_inputs(tmp_path, case):
    good = tmp_path / "00000.parquet"
    write_fused(good, blobs(2, 10, dim=8)[0])
    bad = tmp_path / "00001.parquet"
    if case == "k_too_big":
        write_fused(bad, blobs(2, 5, dim=8)[0], "00001")
        return [good, bad], 50, r"kmeans.k = 50 exceeds the 30 vectors in 2 file\(s\)"
    if case == "nan":
        vectors = blobs(2, 5, dim=8)[0]
        vectors[3, 2] = np.nan
        write_fused(bad, vectors, "00001")
        return [good, bad], 2, r"00001.parquet: 1 vector\(s\) with NaN/inf values \(first: row 3\)"
    if case == "dims":
        write_fused(bad, blobs(2, 5, dim=6)[0], "00001")
        return (
            [good, bad],
            2,
            "00001.parquet: column 'emb' has dimension 6, but .*00000.parquet has 8",
        )
    write_fused(bad, np.zeros((0, 8), np.float32), "00001")
    return [bad], 2, r"kmeans.k = 2 exceeds the 0 vectors in 1 file\(s\)"


def test_an_empty_shard_adds_nothing(tmp_path):
    """A part whose every download failed has an empty fused file: k-means goes on without it."""
    good, empty = tmp_path / "00000.parquet", tmp_path / "00001.parquet"
    write_fused(good, blobs(2, 10, dim=8)[0])
    write_fused(empty, np.zeros((0, 8), np.float32), "00001")
    centroids, stats = cluster_files([str(good), str(empty)], {"k": 2, "niter": 5})
    assert centroids.shape == (2, 8) and stats["vectors"] == stats["sample_size"] == 20


@pytest.mark.parametrize("case", ["k_too_big", "nan", "dims", "empty"])
def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, case):
    paths, k, message = bad_inputs(tmp_path, case)
    out_c = tmp_path / "c.npy"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            main,
            [
                *map(str, paths),
                "--out-centroids",
                str(out_c),
                "--out-stats",
                str(tmp_path / "s.json"),
                "--options-json",
                json.dumps({"k": k}),
            ],
        )
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unicom:")]
    assert len(err) == 1
    import re

    assert re.search(message, err[0]), err[0]
    assert not out_c.exists()


def test_unknown_option_and_missing_gpu_are_config_errors(tmp_path):
    from unicom.errors import UnicomError

    paths = split_files(tmp_path, blobs(2, 10, dim=4)[0], parts=1)
    with pytest.raises(UnicomError, match="config key kmeans.clusters: unknown key"):
        cluster_files(paths, {"clusters": 3})
    import faiss

    if faiss.get_num_gpus() == 0:
        with pytest.raises(UnicomError, match="gpu: true, but faiss sees no GPU"):
            cluster_files(paths, {"k": 2, "gpu": True})


def test_inspect_files_counts_rows_from_metadata(tmp_path):
    paths = split_files(tmp_path, blobs(3, 10, dim=4)[0], parts=3)
    files = inspect_files(paths)
    assert [f.rows for f in files] == [10, 10, 10] and {f.dim for f in files} == {4}
