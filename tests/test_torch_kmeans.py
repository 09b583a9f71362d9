"""The torch k-means backend against faiss on the same data and initialisation, and on 2 real
gloo ranks against 1."""

from __future__ import annotations

import json
import subprocess
import sys

import faiss
import numpy as np
import pytest
import torch
import torch.distributed as dist

from unicom.cluster.assign import assign_file
from unicom.cluster.torch_kmeans import (
    gather_rows,
    kmeans,
    nearest_centroids,
    random_init,
    split_empty,
)
from unicom.vectors import l2_normalize, save_centroids

from helpers.ranks import TORCHRUN_TWO_RANKS, join_gloo, spawn_ranks
from helpers.vectors import blobs as kmeans_blobs
from helpers.vectors import split_files, write_fused

K, DIM, N, NITER, SEED = 40, 32, 4000, 8, 3


def blobs() -> np.ndarray:
    """Unit vectors around K random directions (some overlap, so assignments move)."""
    rng = np.random.default_rng(0)
    centres = l2_normalize(rng.standard_normal((K, DIM)).astype(np.float32))
    labels = rng.integers(K, size=N)
    return l2_normalize(centres[labels] + 0.35 * rng.standard_normal((N, DIM)).astype(np.float32))


X = blobs()
INIT_ROWS = random_init(N, K, SEED)


def faiss_kmeans(x: np.ndarray, init: np.ndarray) -> tuple[np.ndarray, list[float]]:
    km = faiss.Kmeans(DIM, K, niter=NITER, spherical=True, max_points_per_centroid=10**6, seed=SEED)
    km.train(x, init_centroids=init)
    return km.centroids, [float(it["obj"]) for it in km.iteration_stats]


def test_objective_within_one_percent_of_faiss_on_the_same_initialisation():
    torch.set_num_threads(1)
    init = X[INIT_ROWS]
    _, faiss_objectives = faiss_kmeans(X, init.copy())
    result = kmeans(torch.from_numpy(X), torch.from_numpy(init), NITER, SEED, chunk=1000)
    ours = [it["obj"] for it in result.iterations]
    assert ours[0] == pytest.approx(faiss_objectives[0], rel=1e-5)  # same first assignment
    assert ours[-1] == pytest.approx(faiss_objectives[-1], rel=0.01)
    assert ours[-1] > ours[0]  # it learned something


def test_assignment_agrees_with_faiss_on_nearly_every_row():
    centroids, _ = faiss_kmeans(X, X[INIT_ROWS].copy())
    index = faiss.IndexFlatIP(DIM)
    index.add(centroids)
    faiss_sims, faiss_labels = index.search(X, 2)
    for precision in ("fp32", "bf16"):
        sims, labels = nearest_centroids(
            torch.from_numpy(X), torch.from_numpy(centroids), 2, 512, precision
        )
        agree = (labels.numpy()[:, 0] == faiss_labels[:, 0]).mean()
        assert agree >= 0.999, (precision, agree)
        np.testing.assert_allclose(sims.numpy(), faiss_sims, atol=1e-5)


def test_an_empty_cluster_is_split_from_a_populated_one_deterministically():
    centroids = torch.eye(3, 4)
    counts = torch.tensor([5, 0, 1])
    first = centroids.clone()
    assert split_empty(first, counts, np.random.default_rng(1)) == 1
    second = centroids.clone()
    split_empty(second, counts, np.random.default_rng(1))
    torch.testing.assert_close(first, second)
    # Cluster 0 is the only one with points to spare: the empty cluster 1 becomes its twin.
    assert torch.allclose(first[1] / first[1].norm(), first[0] / first[0].norm(), atol=1e-2)
    assert not torch.equal(first[1], first[0])


def _rank(rank: int, world: int, port: int, out: str) -> None:
    join_gloo(rank, world, port)

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    bounds = np.linspace(0, N, world + 1).astype(int)
    local = torch.from_numpy(X[bounds[rank] : bounds[rank + 1]])
    init = gather_rows(local, int(bounds[rank]), INIT_ROWS, reduce)
    result = kmeans(local, init, NITER, SEED, reduce, chunk=700)
    torch.save({"centroids": result.centroids, "iterations": result.iterations}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_give_the_centroids_of_one(tmp_path):
    spawn_ranks(_rank, 2, tmp_path, "k-means ranks")
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(ranks[0]["centroids"], ranks[1]["centroids"], rtol=0, atol=0)
    single = kmeans(torch.from_numpy(X), torch.from_numpy(X[INIT_ROWS]), NITER, SEED, chunk=1000)
    torch.testing.assert_close(ranks[0]["centroids"], single.centroids, rtol=1e-5, atol=1e-5)
    objectives = [it["obj"] for it in ranks[0]["iterations"]]
    assert objectives == pytest.approx([it["obj"] for it in single.iterations], rel=1e-6)


# --- the kmeans stage with kmeans.backend: torch -------------------------------------------------


def run_stage(tmp_path, name: str, paths: list[str], launcher: list[str], **options) -> dict:
    out = tmp_path / name
    options = {"k": 12, "niter": 6, "backend": "torch", "device": "cpu", **options}
    command = [*launcher, "-m", "unicom.cluster.kmeans", *paths, "--threads", "2",
               "--out-centroids", str(out / "centroids.npy"), "--out-stats", str(out / "stats.json"),
               "--options-json", json.dumps(options)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "centroids": np.load(out / "centroids.npy"),
        "stats": json.loads((out / "stats.json").read_text()),
        "stderr": result.stderr,
    }


def test_the_stage_on_two_torchrun_ranks_writes_the_centroids_of_one(tmp_path):
    vectors, _ = kmeans_blobs(12, 60, dim=16, noise=0.2, seed=4)
    paths = split_files(tmp_path, vectors, parts=5)
    one = run_stage(tmp_path, "one", paths, [sys.executable])
    two = run_stage(tmp_path, "two", paths, TORCHRUN_TWO_RANKS)
    assert two["stats"]["ranks"] == 2 and one["stats"]["ranks"] == 1
    assert two["stats"]["sample_size"] == one["stats"]["sample_size"] == 720
    np.testing.assert_allclose(two["centroids"], one["centroids"], atol=1e-5)
    first = [it["objective"] for it in one["stats"]["iterations"]]
    assert [it["objective"] for it in two["stats"]["iterations"]] == pytest.approx(first, rel=1e-6)
    assert first[-1] > first[0]
    assert two["stats"]["backend"] == "torch" and len(two["centroids"]) == 12


@pytest.mark.parametrize(
    "options, message",
    [
        ({"init": "kmeans++"}, "config key kmeans.init: 'kmeans++' is faiss-only"),
        ({"two_level": True}, "config key kmeans.two_level: faiss-only"),
        ({"backend": "cuml"}, "kmeans.backend"),
    ],
)
def test_what_the_torch_backend_does_not_do_is_a_one_line_config_error(tmp_path, options, message):
    path = tmp_path / "00000.parquet"
    write_fused(path, X[:100])
    command = [sys.executable, "-m", "unicom.cluster.kmeans", str(path), "--out-centroids",
               str(tmp_path / "c.npy"), "--out-stats", str(tmp_path / "s.json"), "--options-json",
               json.dumps({"k": 4, "backend": "torch", **options})]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("unicom: error: ") and message in line


def test_assign_with_the_torch_backend_agrees_with_faiss(tmp_path):
    fused = tmp_path / "00000.parquet"
    write_fused(fused, X)
    centroids, _ = faiss_kmeans(X, X[INIT_ROWS].copy())
    save_centroids(tmp_path / "centroids.npy", centroids)
    tables = {}
    for backend in ("faiss", "torch"):
        kmeans_section = {"k": K, "backend": backend, "device": "cpu", "chunk": 999}
        tables[backend] = assign_file(
            str(fused), str(tmp_path / "centroids.npy"), str(tmp_path / f"{backend}.parquet"),
            {}, kmeans=kmeans_section,
        ).to_pydict()  # fmt: skip
    labels = {b: np.array(t["label"]) for b, t in tables.items()}
    assert (labels["torch"] == labels["faiss"]).mean() >= 0.999
    for column in ("sim", "sim2"):
        np.testing.assert_allclose(tables["torch"][column], tables["faiss"][column], atol=1e-5)
