"""Planning: what the Snakefile decides at parse time, as plain functions of the config.

The rule files call these with ``config`` values, paths and part names and turn a
:class:`~unicom.errors.UnicomError` into one ``unicom: error: ...`` line before any job. Nothing
here prints or exits, and nothing knows Snakemake's objects. Library layer: it imports only
``unicom.errors``, ``unicom.formats``, ``unicom.url_list`` and the standard library, never a
stage package.
"""

from __future__ import annotations

import glob
import os
import random
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unicom.errors import UnicomError
from unicom.formats import batch_name, read_export_info
from unicom.url_list import check_url_list

# Where Debian's dataset-fashion-mnist installs the Fashion-MNIST files; fetch_fashion_mnist
# unpacks the same package under demo.resources_dir, at this path relative to the root.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# The trainer the launcher starts on every rank.
TRAIN_MODULE = "unicom.train.train"
KMEANS_MODULE = "unicom.cluster.kmeans"


# --------------------------------------------------------------------------- jobs


def job_shell_prefix(package_dir: str, exports: str) -> str:
    """What every job's shell runs first: the package on PYTHONPATH (for `python -m unicom.*`)
    and ``exports`` (shell lines). Snakemake formats a prefix like a rule's command, so literal
    braces are doubled."""
    text = f"export PYTHONPATH={shlex.quote(package_dir)}${{PYTHONPATH:+:$PYTHONPATH}}; {exports}"
    return text.replace("{", "{{").replace("}", "}}")


# --------------------------------------------------------------------------- batches


def part_suffixes(shards_per_job: int) -> list[str]:
    """The last digits that tell the parts of one batch apart: batch + suffix = part.

    One batch job takes ``shards_per_job`` parts whose names differ only in the digits that
    :func:`unicom.formats.batch_name` drops (``[""]`` for 1, ``"0"``-``"9"`` for 10, ...).
    """
    # A name longer than the dropped digits: what batch_name removes from it is their count.
    probe = "0" * len(str(shards_per_job))
    digits = len(probe) - len(batch_name(probe, shards_per_job))
    if not digits:
        return [""]
    return [f"{i:0{digits}d}" for i in range(shards_per_job)]


def uses_filters(config: Mapping[str, Any]) -> bool:
    """Whether any metadata filter (filters.*) is set."""
    filters = config["filters"]
    return bool(
        filters["clip_score_min"] is not None
        or filters["min_width"]
        or filters["min_height"]
        or filters["columns"]
    )


def uses_screen(config: Mapping[str, Any]) -> bool:
    """Whether the run screens its downloads (content dedup or any metadata filter)."""
    return bool(config["dedup"]["content"] or uses_filters(config))


def checked_reasons(config: Mapping[str, Any]) -> list[str]:
    """The drop reasons the run looks for (the hygiene report says the others were not)."""
    dedup = config["dedup"]
    checks = {
        "duplicate_url": dedup["urls"],
        "duplicate_content": dedup["content"],
        "filtered": uses_filters(config),
        "near_duplicate": dedup["near"],
    }
    return [reason for reason, on in checks.items() if on]


def batch_names(parts: Sequence[str], shards_per_job: int) -> list[str]:
    """The per-shard jobs' batches: part names without their last digits, sorted."""
    return sorted({batch_name(part, shards_per_job) for part in parts})


# --------------------------------------------------------------------------- inputs


def url_list_files(patterns: Sequence[str]) -> list[str]:
    """The files data.url_list's glob patterns name: each pattern's matches sorted, in the
    patterns' order. A pattern that matches nothing is an error (a typo, an unmounted disk)."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise UnicomError(f"config key data.url_list: no file matches {pattern!r}")
        files.extend(matches)
    return files


def check_url_list_plan(config: Mapping[str, Any], files: Sequence[str]) -> int:
    """Before any job, from the Parquet footers of data.url_list's ``files`` only: each file
    is Parquet with the configured columns, the list has rows, and k-means can find its k in
    them. Returns the list's rows."""
    data = config["data"]
    rows = check_url_list(files, data["url_col"], data["caption_col"], data["extra_cols"])
    check_k_rows(config, rows)
    return rows


def check_k_rows(config: Mapping[str, Any], url_list_rows: int) -> None:
    """kmeans.k at most the rows the run takes of the URL list (data.max_rows applied): k-means
    needs k images, and every failed download or dropped duplicate only lowers the count."""
    rows = min(url_list_rows, config["data"]["max_rows"] or url_list_rows)
    k = config["kmeans"]["k"]
    if k <= rows:
        return
    if config["rehearsal"]["enabled"]:  # the rehearsal set kmeans.k and data.max_rows
        raise UnicomError(
            f"config key rehearsal.k: {k} exceeds the {rows} rows the rehearsal takes from "
            "data.url_list: k-means needs at least k downloaded images"
        )
    taken = " (data.max_rows)" if rows < url_list_rows else ""
    raise UnicomError(
        f"config key kmeans.k: {k} exceeds the {rows} rows the run takes from "
        f"data.url_list{taken}: k-means needs at least k downloaded images"
    )


def uses_demo_pool(config: Mapping[str, Any]) -> bool:
    """Whether the run builds the offline demo pool: demo.enabled, no data.url_list and no
    data.shards."""
    data = config["data"]
    return bool(config["demo"]["enabled"] and not data["url_list"] and not data["shards"])


def diagnostic_parts(parts: Sequence[str], diagnostics: Mapping[str, Any]) -> list[str]:
    """The shards the cluster diagnostics read (assign.diagnostics): all of them, or a sample
    of max_shards drawn with its seed, the same for the same parts, in the parts' order."""
    parts = sorted(parts)
    if len(parts) <= diagnostics["max_shards"]:
        return parts
    return sorted(random.Random(diagnostics["seed"]).sample(parts, diagnostics["max_shards"]))


# --------------------------------------------------------------------------- evaluation


def evaluation_models(evaluate: Mapping[str, Any], trained: str) -> dict[str, str]:
    """Model name -> what ``unicom.evaluate --model`` takes: the base encoder, the trained
    export folder ``trained``, and each of evaluate.extra_models under its folder's name."""
    models = {"base": "base", "trained": trained}
    for path in evaluate["extra_models"]:
        check_export(path, "evaluate.extra_models")
        models[os.path.basename(os.path.normpath(path))] = path
    return models


def check_export(path: str, key: str) -> None:
    """``path`` is a folder exported by unicom.train (its model.json says so)."""
    read_export_info(path, f"config key {key}:")


def evaluation_datasets(
    config: Mapping[str, Any], demo_heldout: str
) -> tuple[dict[str, str], list[str]]:
    """The benchmarks to evaluate: (name -> path, names skipped).

    evaluate.datasets.<name> is a path, null (skipped), or "auto" for the demo sets:
    openclipart = ``demo_heldout`` when the run builds the demo pool (else skipped);
    fashion-mnist = the Debian package's folder under demo.system_root when it is installed
    there, else the copy ``fetch_fashion_mnist`` unpacks under demo.resources_dir (every run,
    demo or real, evaluates on it). With evaluate.enabled false there is nothing to evaluate.
    """
    datasets: dict[str, str] = {}
    skipped: list[str] = []
    if not config["evaluate"]["enabled"]:
        return datasets, list(config["evaluate"]["datasets"])
    for name, path in config["evaluate"]["datasets"].items():
        if path == "auto" and name == "openclipart":
            path = demo_heldout if uses_demo_pool(config) else None
        elif path == "auto" and name == "fashion-mnist":
            path = auto_fashion_mnist(config["demo"])
        if path is None:
            skipped.append(name)
        elif path == "auto":
            raise UnicomError(f"config key evaluate.datasets.{name}: 'auto' only for the demo sets")
        else:
            datasets[name] = str(path)
    return datasets, skipped


def check_evaluation(config: Mapping[str, Any], datasets: Mapping[str, str]) -> None:
    """Before any job: a run that evaluates (evaluate.enabled) has a benchmark to evaluate on,
    so that a real run never ends its training with nothing to score."""
    if config["evaluate"]["enabled"] and not datasets:
        raise UnicomError(
            "config key evaluate.datasets: no benchmark to evaluate on (every one is null); "
            "set evaluate.datasets.<name> to a benchmark folder (fashion-mnist: auto fetches "
            "Debian's dataset-fashion-mnist), or evaluate.enabled: false to run without evaluation"
        )


def train_split_paths(
    config: Mapping[str, Any], section: str, test_paths: Mapping[str, str], demo_urls: str
) -> dict[str, str]:
    """Benchmark -> where its train split is, for ``section``'s datasets (linear_probe,
    finetune): each needs a test split (evaluate.datasets) and a train split
    (evaluate.train_splits; "auto" = the test split's folder, the demo pool's URL list for
    openclipart)."""
    paths = {}
    for name in config[section]["datasets"]:
        train = config["evaluate"]["train_splits"].get(name)
        if name not in config["evaluate"]["train_splits"]:
            raise UnicomError(f"config key {section}.datasets: unknown benchmark {name!r}")
        if name not in test_paths:
            raise UnicomError(
                f"config key {section}.datasets: {name} has no test split "
                f"(evaluate.datasets.{name} is null or finds nothing)"
            )
        if train is None:
            raise UnicomError(
                f"config key evaluate.train_splits.{name}: no train split configured for {name}, "
                f"which {section}.datasets lists"
            )
        if train == "auto":
            train = demo_urls if name == "openclipart" else test_paths[name]
        paths[name] = str(train)
    return paths


def image_folders(config: Mapping[str, Any], benchmarks: Sequence[str]) -> dict[str, str]:
    """linear_probe.image_folders, checked: plain names that are not benchmarks' own, and
    folders with a train/ subfolder."""
    folders = {}
    for name, path in config["linear_probe"]["image_folders"].items():
        key = f"config key linear_probe.image_folders.{name}"
        if name in benchmarks or not name.replace("-", "").replace("_", "").isalnum():
            raise UnicomError(f"{key}: use a plain name that is not a benchmark's")
        if not os.path.isdir(os.path.join(path, "train")):
            raise UnicomError(f"{key}: {path} has no train/ folder (ImageFolder layout)")
        folders[name] = str(path)
    return folders


# The trainer's keys fine-tuning sets from the finetune section (the rest: the train section).
FINETUNE_KEYS = (
    "epochs", "steps", "batch_size", "lr", "head_lr_mult", "weight_decay", "warmup_fraction",
    "margin", "scale", "sample_rate", "feature_rate", "augment", "seed",
)  # fmt: skip
# unicom.models' name of the packaged ImageNet weights of the demo encoder's image tower.
DEMO_IMAGE_WEIGHTS = "efficientnet-lite0-package"


def finetune_options(
    config: Mapping[str, Any], model: str, trained_dir: str, train_stage: Mapping[str, Any]
) -> dict[str, Any]:
    """The trainer's options for fine-tuning ``model`` (base or trained): ``train_stage`` (the
    train section as its stage sees it) with the finetune section's settings, the starting
    weights and, for base, the demo encoder's image tower."""
    finetune = config["finetune"]
    options = {**train_stage, **{key: finetune[key] for key in FINETUNE_KEYS}}
    # RandAugment (fine-tuning's default augmentation) is a PIL operation: PIL decodes.
    options.update(positives=1, min_label_margin=None, decode="pil")
    if model == "trained":
        return {**options, "pretrained": trained_dir}
    embed = config["embed"]
    if embed["encoder"] != "demo":
        raise UnicomError(
            f"config key finetune.models: base is the {embed['encoder']} encoder, whose image "
            "tower the trainer cannot build; fine-tune the trained model only"
        )
    return {
        **options,
        "model": embed["demo"]["image_model"],
        "model_kwargs": {},
        "pretrained": DEMO_IMAGE_WEIGHTS,
        "dim": finetune["dim"],
        "image_size": finetune["image_size"],
    }


def fetched_fashion_mnist(resources_dir: str | os.PathLike) -> str:
    """Where fetch_fashion_mnist unpacks dataset-fashion-mnist under demo.resources_dir."""
    return os.path.join(resources_dir, FASHION_MNIST_DIR.relative_to(FASHION_MNIST_DIR.anchor))


def fashion_mnist_marker(resources_dir: str | os.PathLike) -> str:
    """The JSON file fetch_fashion_mnist writes once the copy is unpacked."""
    return os.path.join(resources_dir, "fashion-mnist.json")


def installed_fashion_mnist(system_root: str | os.PathLike) -> str | None:
    """The Debian package's folder under ``system_root`` when its four files are there."""
    folder = os.path.join(system_root, FASHION_MNIST_DIR.relative_to(FASHION_MNIST_DIR.anchor))
    complete = all(os.path.isfile(os.path.join(folder, name)) for name in FASHION_MNIST_FILES)
    return folder if complete else None


def auto_fashion_mnist(demo: Mapping[str, Any]) -> str:
    """fashion-mnist's "auto": the package installed under demo.system_root, else the copy
    under demo.resources_dir (fetch_fashion_mnist makes it)."""
    installed = installed_fashion_mnist(demo["system_root"])
    return installed or fetched_fashion_mnist(demo["resources_dir"])


# --------------------------------------------------------------------------- training


def rank_launcher(
    key: str, section: Mapping[str, Any], resources: Mapping[str, Any], module: str
) -> list[str]:
    """The command that starts the ranks of a rank-parallel stage (``key``: train, kmeans), as
    an argument list. ``section`` is its config section, ``resources`` the job's resources
    (the rule's nodes and tasks, and the profile's ``mpi``)."""
    nproc = int(section["nproc_per_node"])
    if resources.get("mpi"):
        # SLURM profiles set `mpi: srun`; the rule sets `nodes` and `tasks` (= nodes x
        # nproc_per_node): srun starts one rank per task, nproc_per_node on each node, and
        # SLURM's pre-timeout signal reaches every rank (torchrun would not forward SIGUSR1).
        # The counts must be explicit: the plugin drops the allocation's SLURM_NNODES and
        # SLURM_NTASKS from the command's environment, and a bare srun would start one rank.
        return [
            str(resources["mpi"]),
            "--nodes",
            str(resources["nodes"]),
            "--ntasks",
            str(resources["tasks"]),
            "--ntasks-per-node",
            str(nproc),
            "python",
            "-m",
            module,
        ]
    check_multi_node(key, section, None)
    if nproc > 1:
        return ["torchrun", "--standalone", "--nproc-per-node", str(nproc), "-m", module]
    return ["python", "-m", module]


def check_multi_node(key: str, section: Mapping[str, Any], mpi: str | None) -> None:
    """Before any job: several nodes need the profile's srun launch (``mpi``) for ``key``."""
    if int(section["nodes"]) > 1 and not mpi:
        raise UnicomError(
            f"config key {key}.nodes: above 1 needs a SLURM profile that sets "
            f"mpi: srun for {key} (torchrun --standalone runs on one node)"
        )


def train_launcher(train: Mapping[str, Any], resources: Mapping[str, Any]) -> list[str]:
    """The command that starts the training ranks (see ``rank_launcher``)."""
    return rank_launcher("train", train, resources, TRAIN_MODULE)


def check_kmeans_backend(kmeans: Mapping[str, Any]) -> None:
    """What each k-means backend can do: faiss runs in one process; the torch backend is flat
    k-means from seeded random rows."""
    if kmeans["backend"] == "faiss":
        if int(kmeans["nodes"]) * int(kmeans["nproc_per_node"]) > 1:
            raise UnicomError(
                "config key kmeans.nodes: more than one rank needs kmeans.backend: torch "
                "(faiss runs in one process, on all the GPUs it sees)"
            )
        return
    if kmeans["init"] != "random":
        raise UnicomError(
            f"config key kmeans.init: '{kmeans['init']}' is faiss-only; the torch backend "
            "starts from seeded random sample rows (use random)"
        )
    if kmeans["two_level"]:
        raise UnicomError("config key kmeans.two_level: faiss-only; the torch backend is flat")


def kmeans_launcher(kmeans: Mapping[str, Any], resources: Mapping[str, Any]) -> list[str]:
    """The k-means job's command: one process for faiss, the ranks for the torch backend."""
    check_kmeans_backend(kmeans)
    if kmeans["backend"] == "faiss":
        return ["python", "-m", KMEANS_MODULE]
    return rank_launcher("kmeans", kmeans, resources, KMEANS_MODULE)
