"""The rehearsal: a real config (``config/laion400m.yaml``) sized for one small machine by its
``rehearsal`` section, so that the whole real path runs end to end before a cluster run.
Only the keys of ``REHEARSAL_KEYS`` and the scheduler keys change."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

from unicom.errors import UnicomError

# train.pretrained values that fetch weights from a hub at run time.
HUB_PRETRAINED = frozenset({"timm"})


# What the rehearsal may change, beyond every x-scheduler key (tests/test_config.py pins it).
REHEARSAL_KEYS = frozenset(
    {
        "output_dir",
        "data.max_rows",
        "kmeans.k",
        "dedup.groups",
        "train.steps",
        "train.batch_size",
        "train.grad_accum_steps",
        "train.nodes",
        "train.nproc_per_node",
        "train.pretrained",
        "train.num_workers",
        "embed.batch_size",
        "embed.num_workers",
        "evaluate.batch_size",
        "evaluate.num_workers",
        "evaluate.max_images",
    }
)


# near_dedup jobs of a rehearsal (dedup.groups), at most.
REHEARSAL_NEAR_GROUPS = 2

# The rehearsal's forward passes (embed, evaluate) take this many times its training batch.
REHEARSAL_INFERENCE_BATCH = 8


def _set(config: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def rehearse(config: Mapping[str, Any], scheduler_keys: Iterable[str]) -> dict[str, Any]:
    """``config`` (validated, defaults filled) sized for a small machine by its ``rehearsal``
    section. Only the keys of REHEARSAL_KEYS and ``scheduler_keys`` (the x-scheduler keys) change."""
    plan = config["rehearsal"]
    if plan["k"] > plan["rows"]:
        raise UnicomError(
            f"config key rehearsal.k: {plan['k']} exceeds rehearsal.rows ({plan['rows']}): "
            "k-means needs at least k downloaded images"
        )
    rehearsed = copy.deepcopy(dict(config))
    for key in scheduler_keys:
        _set(rehearsed, key, plan[key.rsplit(".", 1)[1]])
    rehearsed["output_dir"] = config["output_dir"] + plan["output_suffix"]
    max_rows = config["data"]["max_rows"]
    rehearsed["data"]["max_rows"] = min(plan["rows"], max_rows or math.inf)
    rehearsed["kmeans"]["k"] = plan["k"]
    # Still more than one near-duplicate job when the real run has several: the gather of
    # every scatter file by group is what the rehearsal must prove.
    rehearsed["dedup"]["groups"] = min(config["dedup"]["groups"], REHEARSAL_NEAR_GROUPS)
    train = rehearsed["train"]
    train.update(
        steps=plan["steps"],
        batch_size=plan["batch_size"],
        grad_accum_steps=1,
        nodes=1,
        nproc_per_node=plan["ranks"],
    )
    if train["pretrained"] in HUB_PRETRAINED:
        train["pretrained"] = None  # seeded random init: the rehearsal proves the path offline
    inference_batch = REHEARSAL_INFERENCE_BATCH * plan["batch_size"]
    for name in ("embed", "train", "evaluate"):
        part = rehearsed[name]
        part["num_workers"] = min(part["num_workers"], max(0, plan["threads"] - 1))
        if name != "train":
            part["batch_size"] = min(part["batch_size"], inference_batch)
    cap = config["evaluate"]["max_images"]
    rehearsed["evaluate"]["max_images"] = min(plan["evaluate_images"], cap or math.inf)
    return rehearsed


def changed_keys(before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "") -> set:
    """Dotted paths of the leaves that differ between two configs (a mapping counts as a
    branch, anything else as a leaf)."""
    changed = set()
    for key in set(before) | set(after):
        path = f"{prefix}{key}"
        old, new = before.get(key), after.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changed |= changed_keys(old, new, path + ".")
        elif old != new:
            changed.add(path)
    return changed
