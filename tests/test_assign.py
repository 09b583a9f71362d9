import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from unicom import formats
from unicom.cli import run_cli
from unicom.cluster.assign import assign_file, assign_vectors, main, nearest_labels
from unicom.errors import UnicomError
from unicom.formats import ASSIGN_METADATA_KEY
from unicom.vectors import centroids_digest, save_centroids

from helpers.vectors import blobs, unit, write_fused


@pytest.fixture
def centroids_file(tmp_path):
    rng = np.random.default_rng(5)
    centroids = unit(rng.normal(size=(6, 16)))
    path = tmp_path / "centroids.npy"
    save_centroids(path, centroids)
    return path, centroids


def test_assign_vectors_matches_brute_force():
    rng = np.random.default_rng(0)
    vectors, centroids = unit(rng.normal(size=(300, 8))), unit(rng.normal(size=(5, 8)))
    labels, sim, sim2 = assign_vectors(vectors, centroids, batch_size=64)
    scores = vectors @ centroids.T
    np.testing.assert_array_equal(labels, scores.argmax(1))
    ranked = np.sort(scores, axis=1)
    np.testing.assert_allclose(sim, ranked[:, -1], atol=1e-5)
    np.testing.assert_allclose(sim2, ranked[:, -2], atol=1e-5)
    assert labels.dtype == np.int32 and sim.dtype == sim2.dtype == np.float32


def test_top_labels_are_the_nearest_centroids_in_order(tmp_path, centroids_file):
    rng = np.random.default_rng(1)
    vectors, centroids = unit(rng.normal(size=(200, 8))), unit(rng.normal(size=(9, 8)))
    labels, sims = nearest_labels(vectors, centroids, top=4, batch_size=64)
    scores = vectors @ centroids.T
    np.testing.assert_array_equal(labels, np.argsort(-scores, axis=1)[:, :4])
    np.testing.assert_allclose(sims, -np.sort(-scores, axis=1)[:, :4], atol=1e-5)
    # Through the file: labels/sims hold all four, label/sim/sim2 the first two of them.
    path, out = tmp_path / "00001.parquet", tmp_path / "assign/00001.parquet"
    write_fused(path, blobs(3, 10, dim=16)[0], "00001")
    table = assign_file(str(path), str(centroids_file[0]), str(out), {"top_labels": 4})
    stacked = np.stack(table["labels"].to_numpy(zero_copy_only=False))
    assert stacked.shape == (30, 4) and all(len(set(row)) == 4 for row in stacked)
    np.testing.assert_array_equal(stacked[:, 0], table["label"].to_numpy())
    sims = np.stack(table["sims"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(sims[:, 1], table["sim2"].to_numpy())
    assert np.all(np.diff(sims, axis=1) <= 0)
    assert formats.read_metadata(str(out), ASSIGN_METADATA_KEY)["top_labels"] == 4
    with pytest.raises(UnicomError, match=r"need at least 7 centroids for the 7 nearest"):
        assign_file(str(path), str(centroids_file[0]), str(out), {"top_labels": 7})


def test_assign_file_keeps_every_key_in_order(tmp_path, centroids_file):
    centroids_path, centroids = centroids_file
    vectors, _ = blobs(3, 20, dim=16)
    keys = write_fused(tmp_path / "00007.parquet", vectors, "00007")
    out = tmp_path / "assign" / "00007.parquet"
    assign_file(str(tmp_path / "00007.parquet"), str(centroids_path), str(out), {"gpu": "auto"})
    table = pq.read_table(out)
    assert table.column_names == ["key", "label", "sim", "sim2", "labels", "sims"]
    assert table.num_rows == 60 and table["key"].to_pylist() == keys
    assert str(table.schema.field("label").type) == "int32"
    assert np.all(table["sim"].to_numpy() >= table["sim2"].to_numpy())
    expected = (
        formats.column_to_numpy(pq.read_table(tmp_path / "00007.parquet")["emb"]) @ centroids.T
    ).argmax(1)
    np.testing.assert_array_equal(table["label"].to_numpy(), expected)
    identity = formats.read_metadata(str(out), ASSIGN_METADATA_KEY)
    assert identity["k"] == 6 and identity["d"] == 16
    assert identity["centroids_sha256"] == centroids_digest(centroids)
    assert identity["fusion"] == {"mode": "concat"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["00007.parquet"]


def bad_fused(tmp_path, case):
    path = tmp_path / "00003.parquet"
    vectors, _ = blobs(2, 5, dim=16)
    if case == "nan":
        vectors[4, 0] = np.inf
        write_fused(path, vectors, "00003")
        return (
            path,
            r"00003.parquet: 1 vector\(s\) with NaN/inf values \(first: key 00003_000000004\)",
        )
    if case == "dims":
        write_fused(path, blobs(2, 5, dim=12)[0], "00003")
        return path, "00003.parquet: embeddings have dimension 12, but the centroids in .* have 16"
    write_fused(path, np.zeros((0, 12), np.float32), "00003")
    return path, "00003.parquet: embeddings have dimension 12, but the centroids in .* have 16"


def test_an_empty_shard_gets_an_empty_assignment(tmp_path, centroids_file):
    path, out = tmp_path / "00003.parquet", tmp_path / "assign/00003.parquet"
    write_fused(path, np.zeros((0, 16), np.float32), "00003")
    table = assign_file(str(path), str(centroids_file[0]), str(out), {"gpu": "auto"})
    assert table.num_rows == 0
    assert pq.read_table(out).column_names == ["key", "label", "sim", "sim2", "labels", "sims"]


@pytest.mark.parametrize("case", ["nan", "dims", "empty"])
def test_bad_shard_is_one_line_naming_the_file(tmp_path, capsys, centroids_file, case):
    path, message = bad_fused(tmp_path, case)
    out = tmp_path / "out.parquet"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            main,
            [
                "--fused",
                str(path),
                "--centroids",
                str(centroids_file[0]),
                "--out",
                str(out),
                "--options-json",
                json.dumps({"gpu": "auto"}),
            ],
        )
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unicom:")]
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not out.exists()


def test_broken_centroids_file_is_named(tmp_path):
    (tmp_path / "centroids.npy").write_bytes(b"not numpy")
    write_fused(tmp_path / "00000.parquet", blobs(2, 3, dim=4)[0])
    with pytest.raises(UnicomError, match="centroids.npy: not a centroids .npy file"):
        assign_file(
            str(tmp_path / "00000.parquet"),
            str(tmp_path / "centroids.npy"),
            str(tmp_path / "a.parquet"),
            {},
        )
