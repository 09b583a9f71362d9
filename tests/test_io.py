import json

import pytest

from unicom.cli import check_pairs, expand_parts
from unicom.errors import UnicomError
from unicom.formats import batch_name


@pytest.fixture
def parts_dir(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"parts": ["00000", "00001", "00002"]}))
    return str(tmp_path)


def test_expand_parts_repeats_templated_paths_in_manifest_order(parts_dir):
    paths = ["r/fused/{part}.parquet", "r/kmeans/centroids.npy"]
    assert expand_parts(paths, parts_dir) == [
        "r/fused/00000.parquet",
        "r/fused/00001.parquet",
        "r/fused/00002.parquet",
        "r/kmeans/centroids.npy",
    ]
    assert expand_parts(["a.parquet", "b.parquet"], None) == ["a.parquet", "b.parquet"]


def test_expand_parts_errors_are_one_line(tmp_path, parts_dir):
    with pytest.raises(UnicomError, match="give --each-part"):
        expand_parts(["r/{part}.tar"], None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/manifest.json").write_text("[1, 2]")
    with pytest.raises(UnicomError, match="not a split_urls manifest") as info:
        expand_parts(["r/{part}.tar"], str(tmp_path / "bad"))
    assert "\n" not in str(info.value)
    with pytest.raises(UnicomError, match="manifest.json"):
        expand_parts(["r/{part}.tar"], str(tmp_path / "missing"))


def test_check_pairs_names_both_lists():
    check_pairs("--shard", ["a", "b"], "--out", ["x", "y"])
    with pytest.raises(UnicomError, match="2 --shard but 1 --out: give one --out per --shard"):
        check_pairs("--shard", ["a", "b"], "--out", ["x"])


def test_batch_name_drops_the_last_digits():
    assert batch_name("00127", 1) == "00127"
    assert batch_name("00127", 10) == "0012"
    assert batch_name("00127", 100) == "001"


def test_expand_parts_over_job_batches(tmp_path):
    parts = [f"000{i:02d}" for i in range(20)]
    manifest = {"parts": parts, "shards_per_job": 10}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert expand_parts(["s/{batch}.summary.json"], str(tmp_path)) == [
        "s/0000.summary.json",
        "s/0001.summary.json",
    ]
