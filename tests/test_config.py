import copy
import json
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

from unicom.config import (
    check_output_dir,
    layered_config,
    load_schema,
    parse_overrides,
    section,
    validate_config,
)
from unicom.errors import UnicomError

from helpers import REPO
from helpers.configs import deep_merge, leaves, schema_defaults


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config/config.yaml").read_text())


def test_defaults_are_filled_into_nested_sections():
    config = validate_config({"data": {"url_list": ["urls.parquet"]}})
    assert config["download"]["allowed_schemes"] == ["http", "https"]
    assert config["embed"]["open_clip"]["model"] == "ViT-B-32"
    assert config["fuse"]["mode"] == "mean"


def test_shipped_configs_validate():
    validate_config(demo_config())
    validate_config(yaml.safe_load((REPO / "config/laion400m.yaml").read_text()))


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("download", "threads", 0, "config key download.threads: 0 is less than the minimum"),
        ("download", "resize_mode", "stretch", "config key download.resize_mode: 'stretch'"),
        ("embed", "encoder", "clip", "config key embed.encoder: 'clip' is not one of"),
        ("demo", "max_images", "many", "config key demo.max_images: 'many' is not of type"),
    ],
)
def test_bad_values_name_the_key(section, key, value, message):
    config = copy.deepcopy(demo_config())
    config[section][key] = value
    with pytest.raises(UnicomError, match=message.replace(".", r"\.")):
        validate_config(config)


def test_nothing_to_do_is_an_error():
    with pytest.raises(UnicomError, match="data.url_list: empty, and demo.enabled is false"):
        validate_config({"demo": {"enabled": False}})


# --------------------------------------------------------------------------- layers


def test_layers_are_schema_then_files_then_overrides(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("data: {url_list: [x.parquet]}\nkmeans: {k: 10, niter: 3}\n")
    second.write_text("kmeans: {k: 20}\n")
    config = layered_config([first, second], {"kmeans": {"niter": "7"}})
    assert config["kmeans"]["k"] == 20 and config["kmeans"]["niter"] == 7
    # Nothing of the demo: the schema's defaults fill the rest.
    assert config["demo"]["enabled"] is False and config["embed"]["encoder"] == "open_clip"
    assert config["download"]["allowed_schemes"] == ["http", "https"]
    # No file: the demo config.
    demo = layered_config([], {}, default_configfile=REPO / "config/config.yaml")
    assert demo["demo"]["enabled"] is True and demo["embed"]["encoder"] == "demo"


def test_config_overrides_are_typed_by_the_schema(tmp_path):
    # Snakemake hands nested --config values over as strings (YAML's base loader).
    overrides = parse_overrides(
        ["kmeans={k: 64, gpu: true}", "download={resize_mode: border}", "output_dir=2024"]
    )
    config = layered_config([], overrides, default_configfile=REPO / "config/config.yaml")
    assert config["kmeans"]["k"] == 64 and config["kmeans"]["gpu"] is True
    assert config["output_dir"] == "2024" and config["download"]["resize_mode"] == "border"


def test_show_prints_what_a_run_would_use(tmp_path):
    url_list = tmp_path / "urls.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "unicom.config", "show", "--json",
         "--configfile", str(REPO / "config/laion400m.yaml"),
         "--config", f"data={{url_list: [{url_list}]}}", "train={steps: 9}"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    shown = json.loads(result.stdout)
    expected = schema_defaults(load_schema())
    for layer in (
        yaml.safe_load((REPO / "config/laion400m.yaml").read_text()),
        {"data": {"url_list": [str(url_list)]}, "train": {"steps": 9}},
    ):
        expected = deep_merge(expected, layer)
    assert leaves(shown) == leaves(expected)


def test_bad_config_files_are_one_line(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(UnicomError, match=r"config file .*list.yaml: expected a mapping, got list"):
        layered_config([listed])
    with pytest.raises(UnicomError, match=r"config key kmeans.clusters: unknown key"):
        layered_config([], {"kmeans": {"clusters": 3}}, REPO / "config/config.yaml")


def test_an_output_dir_that_cannot_be_a_folder_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(UnicomError, match=r"^config key output_dir: .*taken is a file; name a"):
        check_output_dir(str(tmp_path / "taken"))
    with pytest.raises(UnicomError, match=r"^config key output_dir: .*taken/run is below .*tak"):
        check_output_dir(str(tmp_path / "taken/run"))
    check_output_dir(str(tmp_path))  # an existing folder
    check_output_dir(str(tmp_path / "new/run"))  # made by the run


def test_sections_drop_what_only_snakemake_reads():
    assign = section({"assign": {"threads": 3, "batch_size": 10}}, "assign")
    assert assign == {"gpu": "auto", "batch_size": 10, "top_labels": 2}
    diagnostics = section({}, "assign.diagnostics")
    assert "mem_mb" not in diagnostics and diagnostics["grid_images"] == 6
    evaluate = section({}, "evaluate")
    assert not {"datasets", "extra_models", "threads", "gpus"} & set(evaluate)
    with pytest.raises(UnicomError, match="config key embed.open_clip.modle: unknown key"):
        section({"embed": {"open_clip": {"modle": "x"}}}, "embed")


def test_rehearsal_needs_k_rows():
    with pytest.raises(UnicomError, match=r"^config key rehearsal.k: 500 exceeds rehearsal.rows"):
        layered_config([REPO / "config/laion400m.yaml"], {"rehearsal": {"enabled": True, "k": 500}})


def test_the_schema_ships_inside_the_package(tmp_path):
    """A non-editable install must find the schema: it is package data of the wheel."""
    source = tmp_path / "source"  # a copy: setuptools writes build/ into the tree it builds
    shutil.copytree(REPO / "workflow", source / "workflow", ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(REPO / "pyproject.toml", source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = yaml.safe_load(archive.read("unicom/schema.yaml"))
    assert packaged == load_schema()


def test_the_slurm_profile_gives_each_gpu_job_the_cores_the_laion_config_uses():
    """With cpus_per_gpu set, the SLURM plugin asks for that many cores per GPU and not for
    the rule's threads: a job whose threads exceed them runs oversubscribed (the profile gave
    training 8 cores a rank for a rank and its 8 loader workers, and assign 4 for 8 threads)."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())["set-resources"]
    config = layered_config([REPO / "config/laion400m.yaml"])
    short = {}
    for rule, resources in profile.items():
        if "cpus_per_gpu" not in resources:
            continue
        section = config[rule]
        # threads are per node; a multi-node section's GPUs per node are its ranks per node
        gpus_per_node = section.get("nproc_per_node") if section.get("nodes", 1) > 1 else None
        cores = resources["cpus_per_gpu"] * (gpus_per_node or section["gpus"])
        if cores < section["threads"]:
            short[rule] = (cores, section["threads"])
    assert short == {}
