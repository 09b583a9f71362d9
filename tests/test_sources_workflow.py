"""End to end from what users already have: shards written by the real img2dataset (its keys,
its status tables), read where they lie, and the embeddings the real clip-retrieval made of them
(the committed fixture, tests/fixtures/clip_retrieval/, made by its make_fixture.sh), with the
open_clip encoder that made them named in the config. No download, no embed job; the DAG from
fusion on runs as it does for a URL list. Bad inputs stop before any job, in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from unicom import formats
from unicom.formats import column_to_numpy

import existing_shards
from helpers import REPO
from helpers.workflow import job_counts, snakemake_command

pytestmark = pytest.mark.slow

FIXTURE = REPO / "tests/fixtures/clip_retrieval"
PARTS = ["00000", "00001", "00002"]
# What the k-means and training need (no report, evaluation or diagnostics: other tests).
TARGETS = [
    "results/train/model.safetensors",
    "results/download/summary.json",
    "results/embed/precomputed/summary.json",
]


def run_config(inputs: dict[str, Path], **overrides) -> dict:
    config = {
        "output_dir": "results",
        "demo": {"enabled": False},
        "data": {
            "shards": [str(inputs["shards"] / "*.tar")],
            "embeddings": str(FIXTURE),
            "extra_cols": ["similarity"],  # img2dataset saved it beside each row
        },
        # near-duplicates too: their drops name parts, which img2dataset's keys do not hold
        "dedup": {"urls": False, "content": True, "near": True, "groups": 1, "threshold": 0.9},
        "filters": {"columns": [{"column": "similarity", "op": ">=", "value": 0.0}]},
        # the encoder that made the fixture: its identity, and the base model's evaluation
        "embed": {
            "encoder": "open_clip",
            "open_clip": {"model": "ViT-B-32", "pretrained": str(inputs["weights"])},
            "device": "cpu",
            "threads": 1,
        },
        "fuse": {"mode": "mean"},
        "kmeans": {"k": 4, "niter": 10, "threads": 1},
        "train": {
            "model": "tf_efficientnet_lite0",
            "pretrained": None,
            "steps": 4,
            "batch_size": 8,
            "image_size": 64,
            "checkpoint_every": 2,
            "log_every": 1,
            "shuffle_shards": 3,
            "sample_rate": 1.0,
            "dim": 32,
            "num_workers": 0,
            "threads": 1,
        },  # fmt: skip
        "evaluate": {"enabled": False},  # this file checks the sources, not the evaluation
    }
    for section, values in overrides.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def snakemake(
    workdir: Path, config: dict, *args: str, configfiles=()
) -> subprocess.CompletedProcess:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = snakemake_command(workdir, [*configfiles, workdir / "config.yaml"], *args)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("existing")
    shards = existing_shards.build_shards(root)
    weights = existing_shards.write_random_clip(root / "vit-b-32.safetensors")
    return {"root": root, "shards": shards, "weights": weights}


@pytest.fixture(scope="module")
def run(inputs, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("from-existing")
    succeeded(snakemake(workdir, run_config(inputs), *TARGETS))
    return workdir


def precomputed_vectors() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    vectors = {}
    for number in (0, 1):
        image = np.load(FIXTURE / f"img_emb/img_emb_{number}.npy")
        text = np.load(FIXTURE / f"text_emb/text_emb_{number}.npy")
        keys = pq.read_table(FIXTURE / f"metadata/metadata_{number}.parquet")["image_path"]
        vectors.update(zip(keys.to_pylist(), zip(image, text, strict=True), strict=True))
    return vectors


def test_fused_vectors_are_the_precomputed_ones(run, inputs):
    results = run / "results"
    vectors = precomputed_vectors()
    seen = []
    for part in PARTS:
        fused = pq.read_table(results / f"fused/{part}.parquet")
        keys = fused["key"].to_pylist()
        image = np.stack([vectors[k][0] for k in keys]).astype(np.float32)
        text = np.stack([vectors[k][1] for k in keys]).astype(np.float32)
        mean = image + text  # fuse.mode mean of unit vectors, normalised
        mean /= np.linalg.norm(mean, axis=1, keepdims=True)
        assert np.abs(column_to_numpy(fused["emb"]) - mean).max() < 1e-3  # float16
        embedded = pq.read_table(results / f"embed/{part}.parquet")
        assert np.array_equal(
            column_to_numpy(embedded["image_emb"], np.float16), image.astype(np.float16)
        )
        seen += keys
    assert sorted(seen) == sorted(vectors)  # every sample of the shards, img2dataset's keys
    identity = formats.read_metadata(
        str(results / "embed/00000.parquet"), formats.ENCODER_METADATA_KEY
    )
    assert identity["image"]["model"] == "ViT-B-32" and identity["shared_space"] is True
    assert identity["image"]["weights"] == "file:vit-b-32.safetensors"
    assert identity["precomputed"] == str(FIXTURE)
    # no download and no embed job ran: the shards are the user's, linked, never copied
    assert not list((run / ".snakemake").glob("**/embed/*.skipped.csv.*"))
    for part in PARTS:
        link = results / f"shards/{part}.tar"
        assert link.is_symlink() and link.resolve() == inputs["shards"] / f"{part}.tar"


def test_every_row_and_every_embedding_is_accounted_for(run):
    results = run / "results"
    download = json.loads((results / "download/summary.json").read_text())
    # img2dataset's own tables: 24 images, a missing file and bytes that are no image
    assert download["counts"] == {"failed_to_download": 1, "failed_to_resize": 1, "success": 24}
    assert download["input_rows"] == download["url_list_rows"] == existing_shards.ROWS
    summary = json.loads((results / "embed/precomputed/summary.json").read_text())
    assert summary["embedding_rows"] == {"matched": 24, "no_sample": 0, "repeated_key": 0,
                                         "outside_the_shards_taken": 0}  # fmt: skip
    assert summary["shard_samples"]["embedded"] == summary["shard_samples"]["samples"] == 24
    assert summary["shard_samples"]["normalised"] == 0  # clip-retrieval normalises
    # the near-duplicates (random ViT-B-32 weights: many) name the shard of each sample
    near = pq.read_table(results / "hygiene/near/0.parquet").to_pylist()
    tables = {
        p: set(pq.read_table(results / f"shards/{p}.parquet")["key"].to_pylist()) for p in PARTS
    }
    assert near and all(d["key"] in tables[d["part"]] for d in near)
    assert all(d["twin"] in tables[d["twin_part"]] for d in near)
    data = json.loads((results / "train/data.json").read_text())["totals"]
    assert data["kept"] + data["near_duplicate"] == 24 and data["near_duplicate"] == len(near)
    steps = [json.loads(line)["step"] for line in (results / "train/metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]
    labels = [pq.read_table(results / f"assign/{p}.parquet")["label"].to_pylist() for p in PARTS]
    assert sum(map(len, labels)) == 24 and set(sum(labels, [])) <= set(range(4))


def test_a_finished_run_is_finished_and_a_changed_shard_relinks_its_part(run, inputs):
    config = run_config(inputs)
    assert "Nothing to be done" in succeeded(snakemake(run, config, "-n", *TARGETS)).stdout
    # A link's target counts as its input: a shard rewritten in place (here one more sample;
    # Snakemake compares the content of files under 1 MB, the mtime of bigger ones) is linked
    # and read again, and what follows it reruns.
    shard = inputs["shards"] / "00001.tar"
    original, stat = shard.read_bytes(), shard.stat()
    with tarfile.open(shard, "a") as archive:
        archive.addfile(tarfile.TarInfo("000099.txt"))
    try:
        plan = job_counts(succeeded(snakemake(run, config, "-n", *TARGETS)))
    finally:
        shard.write_bytes(original)
        os.utime(shard, (stat.st_atime, stat.st_mtime))
    # its part's link job; then the key ranges are read again, and every batch's import
    assert plan["link_shards"] == 1 and plan["locate_embeddings"] == 1
    assert plan["import_embeddings"] == 3 and plan["train"] == 1
    assert not {"split_urls", "download", "embed"} & set(plan)
    assert "Nothing to be done" in succeeded(snakemake(run, config, "-n", *TARGETS)).stdout


# --------------------------------------------------------------------------- bad inputs


def embeddings_copy(root: Path) -> Path:
    folder = root / "embeddings"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("*.sh", "*.md"))
    return folder


def short_text_file(root: Path) -> dict:
    """text_emb_1.npy one row short of its metadata (a truncated copy)."""
    folder = embeddings_copy(root)
    text = folder / "text_emb/text_emb_1.npy"
    np.save(text, np.load(text)[:-1])
    return {"data": {"embeddings": str(folder)}}


BAD_INPUTS = {
    "rows differ from their metadata": (
        short_text_file,
        r"config key data.embeddings: \S+/text_emb_1.npy holds 9 rows but \S+/metadata_1.parquet 10",
    ),
    "wrong dimension for the named model": (
        lambda root: {"embed": {"open_clip": {"model": "ViT-L-14"}}},
        r"config key data.embeddings: \S+/img_emb_0.npy holds 512-dimensional vectors, but "
        r"embed.open_clip.model ViT-L-14 gives 768; name the encoder that made them",
    ),
    "a shards glob that matches nothing": (
        lambda root: {"data": {"shards": [str(root / "nowhere/*.tar")]}},
        r"config key data.shards: no file matches '\S+/nowhere/\*.tar'",
    ),
    "a URL list as well": (
        lambda root: {"data": {"url_list": [str(root / "urls.parquet")]}},
        r"config key data.shards: give data.url_list \(to download\) or data.shards",
    ),
    "embeddings without shards": (
        lambda root: {"data": {"shards": [], "url_list": [str(root / "urls.parquet")]}},
        r"config key data.embeddings: needs data.shards",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_stop_before_any_job_in_one_line(inputs, tmp_path, case):
    damage, expected = BAD_INPUTS[case]
    overrides = damage(tmp_path)
    config = run_config(inputs)
    for section, values in overrides.items():
        config[section] = {**config[section], **values}
    result = snakemake(tmp_path, config, *TARGETS)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("unicom: error:")]
    assert len(lines) == 1 and re.fullmatch("unicom: error: " + expected + ".*", lines[0]), lines
    # no job started: nothing planned, nothing written
    assert "Job stats" not in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_embeddings_without_a_sample_are_counted_and_stop_the_run_before_k_means(
    run, inputs, tmp_path
):
    # two of the three shards: shard 00002's 5 embedding rows have no sample
    config = run_config(inputs, data={"shards": [str(inputs["shards"] / "0000[01].tar")]})
    encoder = tmp_path / "results/embed/encoder.json"  # the same encoder: not built again
    encoder.parent.mkdir(parents=True)
    shutil.copy2(run / "results/embed/encoder.json", encoder)
    result = snakemake(tmp_path, config, *TARGETS)
    assert result.returncode == 1
    log = (tmp_path / "results/logs/embeddings_summary.log").read_text().splitlines()
    assert log[-1] == (
        "unicom: error: config key data.embeddings_max_unmatched: 5 of 24 embedding rows "
        "(20.8%) have no sample in data.shards, above 1.0%: are they the embeddings of these "
        "shards?"
    )
    assert not (tmp_path / "results/kmeans").exists()
    # counted, not fatal, when the threshold allows it
    config["data"]["embeddings_max_unmatched"] = 0.25
    succeeded(snakemake(tmp_path, config, "results/embed/precomputed/summary.json"))
    summary = json.loads((tmp_path / "results/embed/precomputed/summary.json").read_text())
    assert (
        summary["embedding_rows"]["no_sample"] == 5 and summary["embedding_rows"]["matched"] == 19
    )


# --------------------------------------------------------------------------- the rehearsal


def test_the_rehearsal_takes_the_first_shards_and_their_embeddings(run, inputs, tmp_path):
    """config/laion400m.yaml + config/existing.yaml (as docs/existing-data.md layers them) + the
    rehearsal, with the user's paths (shards, embeddings, weights) pointed at the test's, and the
    columns the LAION filters read (NSFW) replaced by the test shards' own (similarity)."""
    layers = [REPO / "config/laion400m.yaml", REPO / "config/existing.yaml",
              REPO / "config/rehearsal.yaml"]  # fmt: skip
    overrides = {
        "data": {"shards": [str(inputs["shards"] / "*.tar")], "embeddings": str(FIXTURE),
                 "extra_cols": ["similarity"]},
        "filters": {"columns": [{"column": "similarity", "op": ">=", "value": 0.0}]},
        "embed": {"open_clip": {"pretrained": str(inputs["weights"])}},
        "rehearsal": {"rows": 5, "k": 4},
        "evaluate": {"enabled": False},  # this file checks the sources, not the evaluation
    }  # fmt: skip
    encoder = tmp_path / "results-laion400m-rehearsal/embed/encoder.json"
    encoder.parent.mkdir(parents=True)
    shutil.copy2(run / "results/embed/encoder.json", encoder)
    plan = job_counts(succeeded(snakemake(tmp_path, overrides, "-n", configfiles=layers)))
    # the first shards: 9 samples >= 5 rows, but one for each of the 2 ranks; 8 empty parts
    # make a batch of 10: one job per stage
    assert plan["index_shards"] == plan["link_shards"] == plan["import_embeddings"] == 1
    assert plan["fuse"] == plan["assign"] == plan["train"] == 1
    assert not {"split_urls", "download", "embed"} & set(plan)
    target = "results-laion400m-rehearsal/embed/precomputed/summary.json"
    succeeded(snakemake(tmp_path, overrides, target, configfiles=layers))
    results = tmp_path / "results-laion400m-rehearsal"
    index = json.loads((results / "embed/precomputed/index.json").read_text())
    assert [item["placed"] for item in index["files"]] == [9, 10]  # shard 00002's 5: outside
    summary = json.loads((results / "embed/precomputed/summary.json").read_text())
    assert summary["embedding_rows"] == {"matched": 19, "no_sample": 0, "repeated_key": 0,
                                         "outside_the_shards_taken": 5}  # fmt: skip
    manifest = json.loads((results / "parts/manifest.json").read_text())
    assert len(manifest["parts"]) == 10 and manifest["shards_left_out"] == 1
