"""The ablation grid at parse time: variants of the run's config, and which stage outputs they share.

``ablations`` in the config names a baseline (the run's own settings) and variants: one per
value of each ``axes`` key, plus the named ``variants`` (one or two keys each, the paper's
style); each is trained once per seed in ``seeds`` (``train.seed``). A variant may change only
keys its stage receives in the fuse, kmeans, assign and train sections: the download and the
embeddings are always shared.

Each stage's outputs are keyed by what that stage depends on: its own section and every section
upstream of it. A variant whose fuse settings equal the baseline's reads the run's own fused
files; one that changes only ``train.*`` reuses the run's clusters and assignments; the
baseline at the run's own ``train.seed`` is the run's own model. Every other stage output lives
under ``ablations/<stage>/<id>/``, ``<id>`` naming the keys that differ from the baseline
(``kmeans.k=256``), so two variants with the same settings for a stage share its output.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from unicom.config import section, subschema, validate_config
from unicom.errors import UnicomError

# The sections a variant may change, in DAG order, and what each stage depends on.
SECTIONS = ("fuse", "kmeans", "assign", "train")
STAGE_SECTIONS = {
    "fusion": ("fuse",),
    "clustering": ("fuse", "kmeans", "assign"),
    "training": ("fuse", "kmeans", "assign", "train"),
}
BASELINE = "baseline"
# Variant names and stage ids are path components and wildcards.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
MAX_ID_LENGTH = 80


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]  # dotted key -> value
    axis: str | None = None  # the axes key this variant is a value of
    config: dict[str, Any] = field(default_factory=dict)  # the whole effective config
    fusion: str | None = None  # stage ids; None: the run's own output
    clustering: str | None = None
    trainings: dict[int, str | None] = field(default_factory=dict)  # seed -> id


@dataclass
class Grid:
    seeds: list[int]
    compact_dim: int
    variants: dict[str, Variant]
    fusions: dict[str, dict[str, Any]]  # id -> config of the variant that first needs it
    clusterings: dict[str, dict[str, Any]]
    trainings: dict[str, dict[str, Any]]  # id -> config, with train.seed set
    axes: list[str]
    clustering_fusion: dict[str, str | None] = field(default_factory=dict)  # what it reads
    training_clustering: dict[str, str | None] = field(default_factory=dict)


# ----------------------------------------------------------------------------- keys and ids


def stage_keys(name: str) -> set[str]:
    """Dotted keys the stage of section ``name`` receives (x-scheduler/x-planning excluded)."""
    keys = set()

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, spec in node.get("properties", {}).items():
            if spec.get("x-scheduler") or spec.get("x-planning"):
                continue
            if spec.get("type") == "object" and "properties" in spec:
                walk(spec, f"{prefix}{key}.")
            keys.add(f"{prefix}{key}")

    walk(subschema(name), f"{name}.")
    return keys


def check_key(key: str, where: str) -> None:
    """``key`` may be varied: a key a fuse/kmeans/assign/train stage receives, not the seed."""
    if key == "train.seed":
        raise UnicomError(f"config key {where}: vary train.seed with ablations.seeds")
    sections = key.split(".", 1)[0]
    if sections not in SECTIONS:
        raise UnicomError(
            f"config key {where}: {key} is not in {', '.join(SECTIONS)} (the download and the "
            "embeddings are shared by every variant)"
        )
    if key not in stage_keys(sections):
        raise UnicomError(
            f"config key {where}: {key} is not a key the {sections} stage receives "
            f"(unknown, or a scheduler/planning key that changes no result)"
        )


def value_at(config: Mapping[str, Any], key: str) -> Any:
    """The value of dotted ``key`` in ``config``."""
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node


def with_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        node = changed
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = copy.deepcopy(value)
    return changed


def flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, Mapping):
        leaves: dict[str, Any] = {}
        for key, value in node.items():
            leaves.update(flat(value, f"{prefix}.{key}"))
        return leaves
    return {prefix: node}


def differences(config: Mapping, baseline: Mapping, sections: tuple[str, ...]) -> dict[str, Any]:
    """Dotted keys of ``sections`` (as the stages see them) whose values differ, sorted."""
    changed = {}
    for name in sections:
        ours, theirs = flat(section(config, name), name), flat(section(baseline, name), name)
        changed.update({k: v for k, v in ours.items() if theirs.get(k, object()) != v})
    return dict(sorted(changed.items()))


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value


def stage_id(changed: Mapping[str, Any]) -> str | None:
    """``k1=v1__k2=v2`` for the changed keys (None: none changed); a hash when that is not a
    short, plain path component."""
    if not changed:
        return None
    text = "__".join(f"{key}={_text(value)}" for key, value in changed.items())
    if len(text) <= MAX_ID_LENGTH and NAME_PATTERN.match(text):
        return text
    return "h" + hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the plan


def variant_list(ablations: Mapping[str, Any]) -> list[Variant]:
    """The baseline, one variant per axis value, then the named variants; keys checked."""
    variants = [Variant(BASELINE, {})]
    for key, values in ablations["axes"].items():
        where = f"ablations.axes.{key}"
        check_key(key, where)
        if not values:
            raise UnicomError(f"config key {where}: empty value list")
        leaf = key.rsplit(".", 1)[1]
        variants += [Variant(f"{leaf}={_text(v)}", {key: v}, key) for v in values]
    for name, overrides in ablations["variants"].items():
        if not overrides:
            raise UnicomError(f"config key ablations.variants.{name}: changes no key")
        for key in overrides:
            check_key(key, f"ablations.variants.{name}.{key}")
        variants.append(Variant(name, dict(overrides)))
    seen = set()
    for variant in variants:
        if not NAME_PATTERN.match(variant.name) or len(variant.name) > MAX_ID_LENGTH:
            raise UnicomError(
                f"config key ablations: variant name {variant.name!r} is not a short plain name "
                "(letters, digits, . _ = + -)"
            )
        if variant.name in seen:
            raise UnicomError(f"config key ablations: two variants are named {variant.name!r}")
        seen.add(variant.name)
    return variants


def compact_dim(config: Mapping[str, Any]) -> int:
    """ablations.compact_dim, or the smallest of evaluate.dims; it must be one of them."""
    sizes = [d for d in config["evaluate"]["dims"] if d != "full"]
    chosen = config["ablations"]["compact_dim"]
    if chosen is None and sizes:
        return min(sizes)
    if chosen not in sizes:
        raise UnicomError(
            f"config key ablations.compact_dim: {chosen} is not in evaluate.dims "
            f"{config['evaluate']['dims']}"
        )
    return chosen


def plan(config: Mapping[str, Any]) -> Grid:
    """The grid of the effective ``config`` (validated); every variant's config validated too."""
    ablations = config["ablations"]
    own_seed = config["train"]["seed"]
    grid = Grid(list(ablations["seeds"]), compact_dim(config), {}, {}, {}, {}, [])
    for variant in variant_list(ablations):
        try:
            variant.config = validate_config(with_overrides(config, variant.overrides))
        except UnicomError as err:
            raise UnicomError(f"ablation variant {variant.name}: {err}") from None
        variant.fusion = stage_id(differences(variant.config, config, STAGE_SECTIONS["fusion"]))
        clustering = differences(variant.config, config, STAGE_SECTIONS["clustering"])
        variant.clustering = stage_id(clustering)
        training = differences(variant.config, config, STAGE_SECTIONS["training"])
        if variant.fusion is not None:
            grid.fusions.setdefault(variant.fusion, variant.config)
        if variant.clustering is not None:
            grid.clusterings.setdefault(variant.clustering, variant.config)
            grid.clustering_fusion[variant.clustering] = variant.fusion
        for seed in grid.seeds:
            if not training and seed == own_seed:
                variant.trainings[seed] = None
                continue
            key = f"{stage_id(training) or BASELINE}__seed={seed}"
            variant.trainings[seed] = key
            grid.trainings.setdefault(key, with_overrides(variant.config, {"train.seed": seed}))
            grid.training_clustering[key] = variant.clustering
        grid.variants[variant.name] = variant
        if variant.axis and variant.axis not in grid.axes:
            grid.axes.append(variant.axis)
    return grid


def table_runs(
    grid: Grid, datasets: list[str], out: Callable[[str], str] = lambda path: path
) -> list[dict[str, Any]]:
    """What the table stage reads, per variant and seed: the training folder and one
    evaluation per benchmark (paths through ``out``), and what the sampling check needs."""
    runs = []
    for variant in grid.variants.values():
        for seed, training in variant.trainings.items():
            runs.append(
                {
                    "variant": variant.name,
                    "axis": variant.axis,
                    "overrides": variant.overrides,
                    "seed": seed,
                    "train_dir": out(train_dir(training)),
                    "sample_rate": variant.config["train"]["sample_rate"],
                    "k": variant.config["kmeans"]["k"],
                    "evaluations": {
                        name: out(evaluation_path(training, name)) for name in datasets
                    },
                }
            )
    return runs


# ----------------------------------------------------------------------------- paths


def fused_pattern(fusion: str | None) -> str:
    """Fused files (``{part}`` left in) of a fusion id; None: the run's own."""
    return (
        "fused/{part}.parquet" if fusion is None else f"ablations/fused/{fusion}/{{part}}.parquet"
    )


def assign_pattern(clustering: str | None) -> str:
    if clustering is None:
        return "assign/{part}.parquet"
    return f"ablations/clusters/{clustering}/assign/{{part}}.parquet"


def centroids_path(clustering: str | None) -> str:
    if clustering is None:
        return "kmeans/centroids.npy"
    return f"ablations/clusters/{clustering}/centroids.npy"


def train_dir(training: str | None) -> str:
    return "train" if training is None else f"ablations/train/{training}"


def evaluation_path(training: str | None, dataset: str) -> str:
    if training is None:
        return f"evaluate/trained/{dataset}.json"
    return f"ablations/evaluate/{training}/{dataset}.json"
