"""unicom.wiring: what the rules hand their jobs (files to wait for, resources), without
Snakemake."""

import pytest

from unicom import planning, wiring
from unicom.config import layered_config

from helpers import REPO
from helpers.images import install_fashion_mnist

HELDOUT = "results/demo/heldout.parquet"
URLS = "results/demo/urls.parquet"


def demo_config() -> dict:
    return layered_config([], {}, default_configfile=REPO / "config/config.yaml")


# --------------------------------------------------------------------------- resources


def test_a_stage_asks_for_its_sections_memory_and_time_and_gpus_where_it_has_them():
    config = demo_config()
    config["embed"].update(mem_mb=3000, runtime=30, gpus=1)
    assert wiring.job_resources(config, "embed") == {"mem_mb": 3000, "runtime": 30, "gpu": 1}
    # no GPU count: no gpu resource at all (a download never holds a GPU)
    config["download"].update(mem_mb=1000, runtime=30)
    assert wiring.job_resources(config, "download") == {"mem_mb": 1000, "runtime": 30}


def test_a_rank_parallel_stage_asks_for_its_nodes_and_one_task_per_rank():
    config = demo_config()
    config["train"].update(nodes=8, nproc_per_node=8, gpus=64)
    resources = wiring.job_resources(config, "train")
    assert resources["nodes"] == 8 and resources["tasks"] == 64 and resources["gpu"] == 64


def test_a_dotted_name_is_a_nested_section():
    config = demo_config()
    config["assign"]["diagnostics"].update(mem_mb=3000, runtime=20)
    assert wiring.job_resources(config, "assign.diagnostics") == {"mem_mb": 3000, "runtime": 20}
    with pytest.raises(KeyError):
        wiring.job_resources(config, "assign.nothing")


# --------------------------------------------------------------------------- evaluation inputs


def test_each_model_waits_for_what_makes_it():
    models = ["base", "trained", "cub-model"]
    encoder = {"encoder": "results/embed/encoder.json"}
    assert wiring.model_inputs(models, "results/train/model.safetensors", encoder) == {
        "base": {"encoder": "results/embed/encoder.json"},
        "trained": {"model": "results/train/model.safetensors"},
        "cub-model": {},  # an extra model's folder is read as it is
    }
    # fine-tuning's base is the packaged image tower: nothing to wait for
    assert wiring.model_inputs(["base"], "m", {}) == {"base": {}}


def test_demo_sets_wait_for_their_producers(tmp_path):
    fetched = planning.fetched_fashion_mnist(tmp_path / "res")
    marker = planning.fashion_mnist_marker(tmp_path / "res")
    datasets = {"openclipart": HELDOUT, "fashion-mnist": fetched, "cub": str(tmp_path / "cub")}
    expected = {
        "openclipart": {"dataset": HELDOUT},
        "fashion-mnist": {"fetched": marker},
        "cub": {},
    }
    assert wiring.evaluation_dataset_inputs(datasets, HELDOUT, marker) == expected
    # The same once the copy is there: a finished run's inputs do not change under it.
    install_fashion_mnist(tmp_path / "res")
    assert wiring.evaluation_dataset_inputs(datasets, HELDOUT, marker) == expected
    # An installed package (or any other folder) waits for nothing.
    installed = {"fashion-mnist": str(tmp_path / "system/usr/share/datasets/fashion-mnist")}
    assert wiring.evaluation_dataset_inputs(installed, HELDOUT, marker) == {"fashion-mnist": {}}


DATASET_INPUTS = {
    "openclipart": {"dataset": HELDOUT},
    "fashion-mnist": {"fetched": "res/fashion-mnist.json"},
    "cub": {},
}


def test_a_train_split_waits_for_the_demo_pool_or_for_its_test_splits_producer():
    train = {"openclipart": URLS, "fashion-mnist": "res/usr/share/datasets/fashion-mnist"}
    assert wiring.train_split_inputs(train, DATASET_INPUTS, URLS) == {
        "openclipart": {"train": URLS},
        "fashion-mnist": {"fetched": "res/fashion-mnist.json"},
    }


def test_a_probe_waits_for_both_splits_and_an_image_folder_for_nothing():
    train = {"openclipart": URLS, "cub": "/data/cub_train"}
    inputs = wiring.probe_inputs(train, ["flowers"], DATASET_INPUTS, URLS)
    assert inputs == {
        "openclipart": {"dataset": HELDOUT, "train": URLS},
        "cub": {},
        "flowers": {},
    }


# --------------------------------------------------------------------------- existing shards


def test_a_link_job_reads_each_tar_and_the_status_table_beside_it(tmp_path):
    for name in ("a.tar", "a.parquet", "b.tar"):
        (tmp_path / name).touch()
    shard_of = {"00000": str(tmp_path / "a.tar"), "00001": str(tmp_path / "b.tar")}
    # 00002 pads the batch: no tar, nothing to read
    assert wiring.linked_files(["00000", "00001", "00002"], shard_of) == [
        str(tmp_path / "a.tar"),
        str(tmp_path / "a.parquet"),
        str(tmp_path / "b.tar"),
    ]
