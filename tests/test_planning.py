"""unicom.planning: what the Snakefile decides at parse time, without Snakemake."""

import os
import subprocess
import sys

import pytest

from unicom import planning
from unicom.config import layered_config
from unicom.errors import UnicomError
from unicom.formats import batch_name, part_name

from helpers import REPO

HELDOUT = "results/demo/heldout.parquet"


def demo_config() -> dict:
    """The demo run's effective config: the schema's defaults + config/config.yaml."""
    return layered_config([], {}, default_configfile=REPO / "config/config.yaml")


def config_with(
    demo_enabled=True,
    url_list=(),
    image_dir=None,
    resources_dir="res",
    system_root="/nonexistent-system",
    enabled=True,
    shards=(),
    **datasets,
):
    return {
        "demo": {
            "enabled": demo_enabled,
            "image_dir": image_dir,
            "resources_dir": resources_dir,
            "system_root": system_root,
        },
        "data": {"url_list": list(url_list), "shards": list(shards)},
        "evaluate": {"enabled": enabled, "datasets": datasets, "extra_models": []},
    }


def install_fashion_mnist(root) -> str:
    """The four files of Debian's dataset-fashion-mnist under ``root`` (contents irrelevant)."""
    folder = os.path.join(root, "usr/share/datasets/fashion-mnist")
    os.makedirs(folder)
    for name in planning.FASHION_MNIST_FILES:
        open(os.path.join(folder, name), "wb").close()
    return folder


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize(
    ("shards_per_job", "expected"),
    [
        (1, [""]),
        (10, [str(i) for i in range(10)]),
        (100, [f"{i:02d}" for i in range(100)]),
    ],
)
def test_part_suffixes_complete_a_batch_name_to_its_parts(shards_per_job, expected):
    suffixes = planning.part_suffixes(shards_per_job)
    assert suffixes == expected
    # batch + suffix = part, for every part of the batch, and nothing else is in it.
    parts = [part_name(i) for i in range(300)]
    for batch in planning.batch_names(parts, shards_per_job):
        members = [part for part in parts if batch_name(part, shards_per_job) == batch]
        assert [batch + suffix for suffix in suffixes] == members


@pytest.mark.parametrize(
    ("shards_per_job", "expected"),
    [(1, ["00007", "00012", "00013"]), (10, ["0000", "0001"]), (100, ["000"])],
)
def test_batch_names_are_sorted_and_unique(shards_per_job, expected):
    parts = ["00013", "00007", "00012"]
    assert planning.batch_names(parts, shards_per_job) == expected


def test_no_parts_make_no_batches():
    assert planning.batch_names([], 10) == []


# --------------------------------------------------------------------------- hygiene


def test_the_checked_drop_reasons_are_the_configured_checks():
    config = demo_config()
    config["dedup"].update(urls=True, content=False, near=True)
    assert planning.checked_reasons(config) == ["duplicate_url", "near_duplicate"]
    assert not planning.uses_screen(config)
    # any metadata filter screens, and its drops are "filtered"
    config["filters"]["min_width"] = 64
    assert planning.checked_reasons(config) == ["duplicate_url", "filtered", "near_duplicate"]
    assert planning.uses_screen(config)
    config["dedup"].update(urls=False, near=False)
    config["filters"]["min_width"] = 0
    assert planning.checked_reasons(config) == []


# --------------------------------------------------------------------------- URL lists


def test_url_list_files_sort_each_pattern_in_the_patterns_order(tmp_path):
    for name in ("b/2.parquet", "b/1.parquet", "a/9.parquet", "a/10.parquet", "a/x.csv"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    files = planning.url_list_files([str(tmp_path / "b/*.parquet"), str(tmp_path / "a/*.parquet")])
    names = [os.path.relpath(path, tmp_path) for path in files]
    assert names == ["b/1.parquet", "b/2.parquet", "a/10.parquet", "a/9.parquet"]


def test_a_url_list_pattern_without_match_names_the_key_and_pattern(tmp_path):
    (tmp_path / "1.parquet").touch()
    missing = str(tmp_path / "none-*.parquet")
    with pytest.raises(UnicomError) as error:
        planning.url_list_files([str(tmp_path / "*.parquet"), missing])
    assert str(error.value) == f"config key data.url_list: no file matches {missing!r}"


def test_no_url_list_patterns_are_no_files():
    assert planning.url_list_files([]) == []


def k_config(k, max_rows=None, rehearsal=False) -> dict:
    return {"kmeans": {"k": k}, "data": {"max_rows": max_rows}, "rehearsal": {"enabled": rehearsal}}


def test_k_may_be_as_large_as_the_rows_the_run_takes():
    planning.check_k_rows(k_config(10), 10)
    planning.check_k_rows(k_config(10, max_rows=10), 500)
    for config, rows, message in [
        (k_config(11), 10, "config key kmeans.k: 11 exceeds the 10 rows the run takes from "
         "data.url_list: k-means needs at least k downloaded images"),
        (k_config(11, max_rows=10), 500, "config key kmeans.k: 11 exceeds the 10 rows the run "
         "takes from data.url_list (data.max_rows): k-means needs at least k downloaded images"),
        # the rehearsal set k and max_rows: its own key is named
        (k_config(200, max_rows=300, rehearsal=True), 50, "config key rehearsal.k: 200 exceeds "
         "the 50 rows the rehearsal takes from data.url_list: k-means needs at least k "
         "downloaded images"),
    ]:  # fmt: skip
        with pytest.raises(UnicomError) as error:
            planning.check_k_rows(config, rows)
        assert str(error.value) == message


def test_the_url_list_plan_reads_only_footers_and_checks_k(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": ["https://a.org/1.jpg"] * 5, "TEXT": ["a"] * 5}), path)
    config = {**k_config(5), "data": {"url_col": "URL", "caption_col": "TEXT", "extra_cols": [],
                                      "max_rows": None}}  # fmt: skip
    assert planning.check_url_list_plan(config, [str(path)]) == 5
    with pytest.raises(UnicomError, match="^config key kmeans.k: 6 exceeds the 5 rows"):
        planning.check_url_list_plan({**config, "kmeans": {"k": 6}}, [str(path)])


@pytest.mark.parametrize(
    ("enabled", "url_list", "expected"),
    [(True, [], True), (True, ["urls.parquet"], False), (False, [], False)],
)
def test_the_demo_pool_is_built_only_without_a_url_list(enabled, url_list, expected):
    assert planning.uses_demo_pool(config_with(enabled, url_list)) is expected


def test_existing_shards_replace_the_demo_pool():
    assert planning.uses_demo_pool(config_with(True, shards=["shards/*.tar"])) is False


# --------------------------------------------------------------------------- diagnostics


def test_diagnostics_read_every_shard_up_to_max_shards():
    parts = ["00002", "00000", "00001"]
    assert planning.diagnostic_parts(parts, {"max_shards": 3, "seed": 0}) == sorted(parts)


def test_the_diagnostic_sample_is_a_stable_sorted_subset():
    parts = [part_name(i) for i in range(50)]
    options = {"max_shards": 7, "seed": 3}
    sample = planning.diagnostic_parts(parts, options)
    assert len(sample) == 7 == len(set(sample)) and set(sample) <= set(parts)
    assert sample == sorted(sample)
    # The same for the same seed, whatever order the parts come in; another seed, another one.
    assert planning.diagnostic_parts(list(reversed(parts)), options) == sample
    assert planning.diagnostic_parts(parts, {"max_shards": 7, "seed": 4}) != sample


# --------------------------------------------------------------------------- evaluation


def test_evaluation_models_add_extra_models_by_folder_name(tmp_path):
    exports = [tmp_path / "a/train", tmp_path / "b/export"]
    for export in exports:
        export.mkdir(parents=True)
        (export / "model.json").write_text('{"format": "unicom-trained-model/1"}')
    evaluate = {"extra_models": [f"{exports[0]}/", str(exports[1])]}
    assert planning.evaluation_models(evaluate, "results/train") == {
        "base": "base",
        "trained": "results/train",
        "train": f"{exports[0]}/",
        "export": str(exports[1]),
    }
    # An extra model that is not an export stops the plan, naming the key.
    with pytest.raises(UnicomError, match=r"config key evaluate.extra_models: .* is not a unicom"):
        planning.evaluation_models({"extra_models": [str(tmp_path / "a")]}, "results/train")
    (exports[1] / "model.json").write_text('{"format": "timm"}')
    with pytest.raises(UnicomError, match=r"config key evaluate.extra_models: .* description"):
        planning.evaluation_models({"extra_models": [str(exports[1])]}, "results/train")
    assert planning.evaluation_models({"extra_models": []}, "out/train") == {
        "base": "base",
        "trained": "out/train",
    }


def test_auto_openclipart_is_the_demo_heldout_split_only_in_a_demo_run():
    demo = config_with(openclipart="auto")
    assert planning.evaluation_datasets(demo, HELDOUT) == ({"openclipart": HELDOUT}, [])
    real = config_with(url_list=["urls.parquet"], openclipart="auto")
    assert planning.evaluation_datasets(real, HELDOUT) == ({}, ["openclipart"])


def test_auto_fashion_mnist_prefers_the_installed_package(tmp_path):
    installed = install_fashion_mnist(tmp_path / "system")
    for demo in (True, False):  # a demo or a real run alike
        config = config_with(
            demo_enabled=demo,
            url_list=[] if demo else ["urls.parquet"],
            resources_dir=str(tmp_path / "res"),
            system_root=str(tmp_path / "system"),
            **{"fashion-mnist": "auto"},
        )
        assert planning.evaluation_datasets(config, HELDOUT) == ({"fashion-mnist": installed}, [])


def test_auto_fashion_mnist_is_otherwise_the_fetched_copy_in_every_run(tmp_path):
    fetched = os.path.join(tmp_path / "res", "usr/share/datasets/fashion-mnist")
    auto = {"fashion-mnist": "auto"}
    # An incomplete package (a file missing) is not used in place.
    install_fashion_mnist(tmp_path / "system")
    os.remove(tmp_path / "system/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    common = {"resources_dir": str(tmp_path / "res"), "system_root": str(tmp_path / "system")}
    demo = config_with(**common, **auto)
    real = config_with(url_list=["u.parquet"], **common, **auto)
    folder = config_with(image_dir="images", **common, **auto)
    for config in (demo, real, folder):
        assert planning.evaluation_datasets(config, HELDOUT) == ({"fashion-mnist": fetched}, [])


def test_a_run_with_nothing_to_evaluate_stops_unless_it_says_so():
    nothing = config_with(url_list=["u.parquet"], openclipart="auto", **{"fashion-mnist": None})
    datasets, skipped = planning.evaluation_datasets(nothing, HELDOUT)
    assert datasets == {} and skipped == ["openclipart", "fashion-mnist"]
    with pytest.raises(UnicomError) as error:
        planning.check_evaluation(nothing, datasets)
    message = str(error.value)
    assert message.startswith("config key evaluate.datasets: no benchmark to evaluate on")
    assert "evaluate.enabled: false" in message and "\n" not in message
    # Said explicitly: no benchmark, no evaluate job, no error.
    off = config_with(url_list=["u.parquet"], enabled=False, **{"fashion-mnist": "auto"})
    assert planning.evaluation_datasets(off, HELDOUT) == ({}, ["fashion-mnist"])
    planning.check_evaluation(off, {})


def test_null_datasets_are_skipped_and_explicit_paths_kept_in_order(tmp_path):
    config = config_with(cub=None, sop="/data/sop", cars="relative/cars", gldv2=None)
    datasets, skipped = planning.evaluation_datasets(config, HELDOUT)
    assert list(datasets.items()) == [("sop", "/data/sop"), ("cars", "relative/cars")]
    assert skipped == ["cub", "gldv2"]


def test_auto_for_another_dataset_names_the_key():
    with pytest.raises(UnicomError) as error:
        planning.evaluation_datasets(config_with(cub="auto"), HELDOUT)
    assert str(error.value) == "config key evaluate.datasets.cub: 'auto' only for the demo sets"


def test_the_demo_config_evaluates_its_two_demo_sets(tmp_path):
    config = demo_config()
    config["evaluate"]["datasets"] = {"openclipart": "auto", "fashion-mnist": "auto", "cub": None}
    config["demo"].update(resources_dir=str(tmp_path), system_root=str(tmp_path / "absent"))
    datasets, skipped = planning.evaluation_datasets(config, HELDOUT)
    assert datasets == {
        "openclipart": HELDOUT,
        "fashion-mnist": planning.fetched_fashion_mnist(tmp_path),
    }
    assert skipped == ["cub"]


def test_the_laion_config_evaluates_fashion_mnist(tmp_path):
    config = layered_config(
        [REPO / "config/laion400m.yaml"],
        {"data": {"url_list": ["u.parquet"]}, "demo": {"resources_dir": str(tmp_path)}},
    )
    config["demo"]["system_root"] = str(tmp_path / "absent")
    datasets, _ = planning.evaluation_datasets(config, HELDOUT)
    assert datasets == {"fashion-mnist": planning.fetched_fashion_mnist(tmp_path)}


def test_the_fetched_copy_mirrors_the_system_path():
    assert planning.fetched_fashion_mnist("resources") == os.path.join(
        "resources", "usr/share/datasets/fashion-mnist"
    )
    assert str(planning.FASHION_MNIST_DIR) == "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------- training


def probe_config(**evaluate):
    config = layered_config([str(REPO / "config/config.yaml")], {})
    config["evaluate"]["train_splits"].update(evaluate)
    return config


def test_train_splits_default_to_the_test_folder_and_the_demo_pool():
    config = probe_config(cub="/data/cub_train_elsewhere")
    config["linear_probe"]["datasets"] = ["openclipart", "fashion-mnist", "cub"]
    tests = {"openclipart": "r/demo/heldout.parquet", "fashion-mnist": "/fm", "cub": "/data/cub"}
    paths = planning.train_split_paths(config, "linear_probe", tests, "r/demo/urls.parquet")
    assert paths == {
        "openclipart": "r/demo/urls.parquet",
        "fashion-mnist": "/fm",
        "cub": "/data/cub_train_elsewhere",
    }


@pytest.mark.parametrize(
    ("datasets", "splits", "message"),
    [
        (["cub"], {}, "config key linear_probe.datasets: cub has no test split"),
        (["mnist"], {}, "config key linear_probe.datasets: unknown benchmark 'mnist'"),
        (
            ["openclipart"],
            {"openclipart": None},
            "config key evaluate.train_splits.openclipart: no train split configured",
        ),
    ],
)
def test_a_probe_without_a_split_names_the_key(datasets, splits, message):
    config = probe_config(**splits)
    config["linear_probe"]["datasets"] = datasets
    tests = {"openclipart": "h.parquet"}
    with pytest.raises(UnicomError, match=message):
        planning.train_split_paths(config, "linear_probe", tests, "u.parquet")


def test_finetune_options_start_from_the_export_or_the_demo_image_tower():
    config = layered_config([str(REPO / "config/config.yaml")], {})
    train = {"model": "vit", "model_kwargs": {}, "dim": 256, "image_size": 112, "device": "cpu"}
    trained = planning.finetune_options(config, "trained", "results/train", train)
    assert trained["pretrained"] == "results/train" and trained["model"] == "vit"
    assert (trained["lr"], trained["scale"], trained["head_lr_mult"]) == (0.0001, 32.0, 5.0)
    assert trained["augment"]["rand_augment_ops"] == 2 and trained["device"] == "cpu"
    base = planning.finetune_options(config, "base", "results/train", train)
    assert (base["model"], base["pretrained"]) == (
        "tf_efficientnet_lite0",
        "efficientnet-lite0-package",
    )
    assert (base["dim"], base["image_size"]) == (512, 224)
    config["embed"]["encoder"] = "open_clip"
    with pytest.raises(UnicomError, match="config key finetune.models: base is the open_clip"):
        planning.finetune_options(config, "base", "results/train", train)


def test_the_protocols_config_probes_two_sets_and_fine_tunes_both_models():
    config = layered_config(
        [str(REPO / "config/config.yaml"), str(REPO / "config/protocols.yaml")], {}
    )
    tests = {"openclipart": "r/demo/heldout.parquet", "fashion-mnist": "/fm"}
    probes = planning.train_split_paths(config, "linear_probe", tests, "r/demo/urls.parquet")
    assert probes == {"fashion-mnist": "/fm", "openclipart": "r/demo/urls.parquet"}
    assert planning.train_split_paths(config, "finetune", tests, "u") == {"fashion-mnist": "/fm"}
    for model in config["finetune"]["models"]:
        planning.finetune_options(config, model, "r/train", config["train"])


def test_image_folders_for_probes_are_checked(tmp_path):
    config = layered_config([str(REPO / "config/config.yaml")], {})
    (tmp_path / "cifar10/train").mkdir(parents=True)
    config["linear_probe"]["image_folders"] = {"cifar10": str(tmp_path / "cifar10")}
    assert planning.image_folders(config, ["cub"]) == {"cifar10": str(tmp_path / "cifar10")}
    config["linear_probe"]["image_folders"] = {"food": str(tmp_path)}
    with pytest.raises(UnicomError, match="image_folders.food: .* has no train/ folder"):
        planning.image_folders(config, ["cub"])
    config["linear_probe"]["image_folders"] = {"cub": str(tmp_path / "cifar10")}
    with pytest.raises(UnicomError, match="image_folders.cub: use a plain name"):
        planning.image_folders(config, ["cub"])


def test_one_local_rank_is_a_plain_python_process():
    train = {"nodes": 1, "nproc_per_node": 1}
    assert planning.train_launcher(train, {"nodes": 1, "tasks": 1}) == [
        "python",
        "-m",
        "unicom.train.train",
    ]


def test_local_ranks_on_one_node_start_under_torchrun():
    train = {"nodes": 1, "nproc_per_node": 4}
    assert planning.train_launcher(train, {"nodes": 1, "tasks": 4, "mpi": None}) == [
        "torchrun",
        "--standalone",
        "--nproc-per-node",
        "4",
        "-m",
        "unicom.train.train",
    ]


def test_srun_gets_explicit_node_and_task_counts():
    train = {"nodes": 8, "nproc_per_node": 8}
    resources = {"mpi": "srun", "nodes": 8, "tasks": 64}
    assert planning.train_launcher(train, resources) == [
        "srun",
        "--nodes",
        "8",
        "--ntasks",
        "64",
        "--ntasks-per-node",
        "8",
        "python",
        "-m",
        "unicom.train.train",
    ]


def test_srun_starts_even_one_rank():
    command = planning.train_launcher(
        {"nodes": 1, "nproc_per_node": 1}, {"mpi": "srun", "nodes": 1, "tasks": 1}
    )
    assert command[:2] == ["srun", "--nodes"] and command[-3:] == [
        "python",
        "-m",
        "unicom.train.train",
    ]


def test_several_nodes_without_srun_name_the_key():
    config = demo_config()
    config["train"].update(nodes=2, nproc_per_node=1)
    with pytest.raises(UnicomError) as error:
        planning.train_launcher(config["train"], {"nodes": 2, "tasks": 2})
    message = str(error.value)
    assert message.startswith("config key train.nodes: above 1 needs a SLURM profile")
    assert "mpi: srun" in message and "\n" not in message


# --------------------------------------------------------------------------- layering


def test_planning_loads_no_stage_package():
    """Library layer: the Snakefile imports it at parse time, and so may every stage."""
    stages = ("data", "embed", "hygiene", "cluster", "train", "evaluate", "demo", "report")
    stages += ("supervised", "ablations", "tools")
    code = (
        "import sys, unicom.planning; "
        f"print(sorted(m for m in sys.modules if m.split('.')[:2][-1] in {stages!r}"
        " and m.startswith('unicom.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "workflow")},
    )
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- k-means


def kmeans_section(**changes) -> dict:
    section = demo_config()["kmeans"]
    section.update({"init": "random", "two_level": False, **changes})  # the demo: kmeans++
    return section


def test_faiss_kmeans_is_one_plain_process_even_under_a_slurm_profile():
    command = planning.kmeans_launcher(kmeans_section(), {"mpi": "srun", "nodes": 1, "tasks": 1})
    assert command == ["python", "-m", "unicom.cluster.kmeans"]


def test_torch_kmeans_ranks_start_like_training():
    two = kmeans_section(backend="torch", nproc_per_node=2)
    assert planning.kmeans_launcher(two, {"nodes": 1, "tasks": 2}) == [
        "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "unicom.cluster.kmeans"
    ]  # fmt: skip
    many = kmeans_section(backend="torch", nodes=4, nproc_per_node=8)
    command = planning.kmeans_launcher(many, {"mpi": "srun", "nodes": 4, "tasks": 32})
    assert command[:7] == ["srun", "--nodes", "4", "--ntasks", "32", "--ntasks-per-node", "8"]
    with pytest.raises(UnicomError, match="^config key kmeans.nodes: above 1 needs a SLURM"):
        planning.kmeans_launcher(many, {"nodes": 4, "tasks": 32})


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"backend": "faiss", "nproc_per_node": 2}, "kmeans.nodes"),
        ({"backend": "faiss", "nodes": 2}, "kmeans.nodes"),
        ({"backend": "torch", "init": "kmeans++"}, "kmeans.init"),
        ({"backend": "torch", "two_level": True}, "kmeans.two_level"),
    ],
)
def test_what_a_kmeans_backend_cannot_do_names_the_key(changes, key):
    with pytest.raises(UnicomError, match=f"^config key {key}: "):
        planning.check_kmeans_backend(kmeans_section(**changes))


def test_several_nodes_need_the_profiles_srun_before_any_job():
    section = kmeans_section(backend="torch", nodes=2)
    with pytest.raises(UnicomError, match="^config key kmeans.nodes: above 1 needs a SLURM"):
        planning.check_multi_node("kmeans", section, None)
    planning.check_multi_node("kmeans", section, "srun")
    planning.check_multi_node("kmeans", kmeans_section(backend="torch", nproc_per_node=8), None)


def test_the_job_prefix_survives_snakemakes_formatting():
    prefix = planning.job_shell_prefix("/opt/my {pkg}", "export X='a{b}';")
    # Snakemake formats a prefix like a command: the doubled braces come out single.
    assert prefix.format() == (
        "export PYTHONPATH='/opt/my {pkg}'${PYTHONPATH:+:$PYTHONPATH}; export X='a{b}';"
    )
