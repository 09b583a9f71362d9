"""Rule wiring: what the rules hand their jobs, as plain functions of config values and paths.

rules/common.smk calls these at parse time and hands the results to Snakemake: the files the
jobs of each wildcard value wait for (a dict per value, which a rule unpacks through
``by_wildcard``) and the resources a stage's jobs ask for. The decisions behind them (which
benchmarks, which models, where a train split is) are :mod:`unicom.planning`'s. Nothing here
knows Snakemake's objects. Library layer: it imports only ``unicom.planning``,
``unicom.sources`` and the standard library, never a stage package.
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from unicom.planning import fetched_fashion_mnist
from unicom.sources import status_table

# --------------------------------------------------------------------------- resources


def job_resources(config: Mapping[str, Any], name: str) -> dict[str, int]:
    """What the jobs of stage ``name`` ask the scheduler for, from its config section's
    x-scheduler keys (a dotted name is a nested section, assign.diagnostics): mem_mb and
    runtime; gpu where the section has a GPU count; nodes and tasks (one per rank) where it
    starts ranks (nodes x nproc_per_node, launched like training)."""
    section = functools.reduce(operator.getitem, name.split("."), config)
    resources = {"mem_mb": section["mem_mb"], "runtime": section["runtime"]}
    if "gpus" in section:
        resources["gpu"] = section["gpus"]
    if "nproc_per_node" in section:
        resources["nodes"] = section["nodes"]
        resources["tasks"] = section["nodes"] * section["nproc_per_node"]
    return resources


# --------------------------------------------------------------------------- evaluation inputs


def model_inputs(
    models: Iterable[str], trained_model: str, base: Mapping[str, str]
) -> dict[str, dict[str, str]]:
    """Model name -> the files a job using that model waits for: the trained export's weights
    ``trained_model`` for trained, ``base`` for the base encoder, nothing for a folder of
    evaluate.extra_models (read as it is)."""
    inputs: dict[str, dict[str, str]] = {name: {} for name in models}
    if "base" in inputs:
        inputs["base"] = dict(base)
    if "trained" in inputs:
        inputs["trained"] = {"model": trained_model}
    return inputs


def evaluation_dataset_inputs(
    datasets: Mapping[str, str], demo_heldout: str, fashion_mnist_marker: str
) -> dict[str, dict[str, str]]:
    """Dataset name -> the files its evaluate jobs wait for, as ``unpack`` takes them: the
    demo's held-out split ``demo_heldout``; for the fetched fashion-mnist copy, the marker
    ``fetch_fashion_mnist`` writes (declared whether or not the copy is there yet, so that a
    finished run plans nothing); other paths are read as they are, with no file declared."""
    fetched = fetched_fashion_mnist(os.path.dirname(fashion_mnist_marker))
    inputs: dict[str, dict[str, str]] = {}
    for name, path in datasets.items():
        if path == demo_heldout:
            inputs[name] = {"dataset": path}
        elif name == "fashion-mnist" and os.path.normpath(path) == os.path.normpath(fetched):
            inputs[name] = {"fetched": fashion_mnist_marker}
        else:
            inputs[name] = {}
    return inputs


def train_split_inputs(
    train_paths: Mapping[str, str],
    dataset_inputs: Mapping[str, Mapping[str, str]],
    demo_urls: str,
) -> dict[str, dict[str, str]]:
    """Benchmark -> what a job reading its train split (``train_paths``) waits for: the demo
    pool's URL list ``demo_urls``, or what its test split waits for (the same folder)."""
    return {
        name: {"train": path} if path == demo_urls else dict(dataset_inputs[name])
        for name, path in train_paths.items()
    }


def probe_inputs(
    train_paths: Mapping[str, str],
    folders: Iterable[str],
    dataset_inputs: Mapping[str, Mapping[str, str]],
    demo_urls: str,
) -> dict[str, dict[str, str]]:
    """Benchmark or image folder -> what its linear-probe jobs wait for: a benchmark's test and
    train splits' files; an image folder (linear_probe.image_folders) nothing, it is read as
    it is."""
    train = train_split_inputs(train_paths, dataset_inputs, demo_urls)
    inputs = {name: {**dataset_inputs[name], **train[name]} for name in train_paths}
    return {**inputs, **{name: {} for name in folders}}


# --------------------------------------------------------------------------- existing shards


def linked_files(parts: Sequence[str], shard_of: Mapping[str, str]) -> list[str]:
    """The user's files a link_shards job over ``parts`` reads: each part's tar
    (``shard_of``; padding parts have none) and img2dataset's status table beside it, where
    there is one. A newer one relinks its part."""
    files = []
    for part in parts:
        if part in shard_of:
            table = status_table(shard_of[part])
            files += [shard_of[part], *([table] if table else [])]
    return files
