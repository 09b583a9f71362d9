import json
import os
import stat
import subprocess
import sys

import pytest

from unicom.cli import check_pairs, expand_parts
from unicom.errors import UnicomError
from unicom.formats import batch_name

from helpers import REPO


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


# A group sharing a results folder runs under umask 002: what a stage writes must be group-
# writable then. The umask is read when unicom.io is imported, hence a process of its own.
UMASK_002_WRITES = """
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from unicom.io import atomic_dir, atomic_path, follow_umask

root = Path(sys.argv[1])
with atomic_path(root / "model.safetensors") as tmp:
    save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors writes 0600 itself
with atomic_dir(root / "parts") as tmp:  # mkdtemp: 0700
    (tmp / "manifest.json").write_text("{}")
follow_umask(root / "unpacked")
"""


def test_outputs_are_group_writable_under_umask_002(tmp_path):
    unpacked = tmp_path / "unpacked"
    (unpacked / "bin").mkdir(parents=True)
    (unpacked / "data.txt").write_text("")
    (unpacked / "bin/tool").write_text("")
    for path, mode in ((unpacked / "data.txt", 0o644), (unpacked / "bin/tool", 0o755)):
        path.chmod(mode)  # as a package's files come
    (unpacked / "bin").chmod(0o700)
    subprocess.run(
        ["bash", "-c", 'umask 002 && exec "$@"', "-", sys.executable, "-c", UMASK_002_WRITES]
        + [str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REPO / "workflow")},
        check=True,
    )
    modes = {
        str(path.relative_to(tmp_path)): stat.S_IMODE(path.stat().st_mode)
        for path in tmp_path.rglob("*")
    }
    assert modes == {
        "model.safetensors": 0o664,
        "parts": 0o775,
        "parts/manifest.json": 0o664,
        "unpacked": 0o775,
        "unpacked/data.txt": 0o664,
        "unpacked/bin": 0o775,
        "unpacked/bin/tool": 0o775,
    }
