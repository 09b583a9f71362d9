# Shared by the rule files, and only what they share. Paths under the output folder, the
# parts every per-shard stage maps over, the jobs' environments and resources, the hygiene
# drops, the benchmarks and the ablation grid's stage ids; with every function a rule names
# (Snakemake's linter keeps functions out of rule files). A rule file reads this file and
# itself, nothing else (tests/test_rules.py). The decisions are plain functions of
# unicom.planning and unicom.wiring, tested without Snakemake.

import glob
import json
import os
import sys
from pathlib import Path

from unicom import planning, sources, wiring
from unicom.ablations import grid
from unicom.config import section
from unicom.data.existing import NO_SOURCE
from unicom.errors import UnicomError

OUT = config["output_dir"]


wildcard_constraints:
    part=r"\d+",
    batch=r"\d+",
    # the ablation grid's stage ids (unicom.ablations.grid)
    fusion=r"[A-Za-z0-9][A-Za-z0-9._=+-]*",
    clustering=r"[A-Za-z0-9][A-Za-z0-9._=+-]*",
    training=r"[A-Za-z0-9][A-Za-z0-9._=+-]*",


def out(path):
    """Path of an artifact under the configured output folder."""
    return os.path.join(OUT, path)


def planned(function, *args):
    """function(*args) of unicom.planning; bad input stops the run with one line, before any
    job, like the Snakefile's config errors."""
    try:
        return function(*args)
    except UnicomError as err:
        sys.exit(f"unicom: error: {err}")


def profile_resource(rule, name):
    """A resource the profile (or --set-resources) sets for `rule`; spawned jobs get the same."""
    return workflow.resource_settings.overwrite_resources.get(rule, {}).get(name)


def as_json(value):
    """A config section as one JSON string for `--options-json {params.options:q}`."""
    return json.dumps(value, sort_keys=True)


def stage_options(name):
    """The config section `name` as its stage receives it (JSON): keys the schema marks
    x-scheduler or x-planning stay out of the params, so changing them reruns nothing.
    """
    return as_json(section(config, name))


# ------------------------------------------------------------------ job environments


def stage_env(name):
    """The conda environment of stage `name`'s jobs: CUDA's torch when its config section
    asks for GPUs, else the CPU build (paths relative to rules/)."""
    return (
        "../envs/torch-gpu.yaml" if config[name]["gpus"] else "../envs/torch-cpu.yaml"
    )


def job_resources(name):
    """What the jobs of stage `name` (a config section, dotted for a nested one) ask the
    scheduler for: `resources: **job_resources(name)`."""
    return wiring.job_resources(config, name)


def train_launcher(wildcards, resources):
    """The command that starts the training ranks (a function of the job's resources: the
    profile's `mpi` and the rule's nodes and tasks)."""
    return planned(planning.train_launcher, config["train"], dict(resources.items()))


def kmeans_launcher(wildcards, resources):
    """The k-means job's command: one process (faiss), or ranks like training (torch)."""
    return planned(planning.kmeans_launcher, config["kmeans"], dict(resources.items()))


# ------------------------------------------------------------------ input and params functions


def by_wildcard(mapping, name):
    """An input or params function: mapping[wildcards.<name>]. With unpack(), a dict of named
    files per wildcard value, planned at parse time."""

    def value(wildcards):
        return mapping[wildcards[name]]

    return value


def output_folder(name):
    """A params function: the folder of output `name`, derived from the output as Snakemake
    asks of a path param (its linter flags a hardcoded prefix of an output; the params
    rerun trigger leaves such a function to the output's own)."""

    def folder(wildcards, output):
        return os.path.dirname(output[name])

    return folder


def input_folder(name):
    """A params function: the folder of input `name`."""

    def folder(wildcards, input):
        return os.path.dirname(input[name])

    return folder


def inside_input(name, path):
    """A params function: `path` inside input folder `name` (its {part} kept)."""

    def joined(wildcards, input):
        return os.path.join(input[name], path)

    return joined


# ------------------------------------------------------------------ parts and batches

# Per-shard rules (download, embed, fuse, assign) run one job per batch of parts whose names
# share all but their last digits, so that 10,000 shards make 1,000 jobs per stage with 10 per
# job (Snakemake spends ~1 ms per job planning, and a scheduler wants fewer jobs too).
SHARDS_PER_JOB = config["download"]["shards_per_job"]
PART_SUFFIXES = planning.part_suffixes(SHARDS_PER_JOB)

# data.shards (rules/sources.smk): the tars, the first ones the run takes (data.max_rows: whole
# shards) and their part names, known at parse time in every Snakemake process.
SHARD_FILES = (
    planned(sources.shard_files, config["data"]["shards"])
    if config["data"]["shards"]
    else []
)
SHARDS_TAKEN, SAMPLES_TAKEN = (
    planned(
        sources.shards_taken,
        SHARD_FILES,
        config["data"]["max_rows"],
        config["train"]["nodes"] * config["train"]["nproc_per_node"],
    )
    if SHARD_FILES
    else (0, None)
)
SOURCE_PARTS = (
    planned(sources.padded_parts, SHARDS_TAKEN, SHARDS_PER_JOB) if SHARD_FILES else []
)
SHARD_OF = dict(zip(SOURCE_PARTS, SHARD_FILES[:SHARDS_TAKEN]))


def part_names():
    """Names of the parts (= shards): data.shards' (known at parse time), else the URL-list
    parts, known once the split checkpoint (rules/download.smk) ran. Snakemake waits for a
    checkpoint only through its object, the one name this file takes from a rule file.
    """
    if SOURCE_PARTS:
        return SOURCE_PARTS
    parts_dir = checkpoints.split_urls.get().output[0]
    return sorted(Path(p).stem for p in glob.glob(os.path.join(parts_dir, "*.parquet")))


def pattern_of(pattern, wildcards):
    """`pattern`, or the pattern a function of the wildcards gives (a grid variant's files)."""
    return pattern(wildcards) if callable(pattern) else pattern


def all_parts(pattern, sample=None):
    """An input function: `pattern` for every part, or for the parts `sample(parts)` picks."""

    def files(wildcards):
        parts = part_names()
        return expand(
            out(pattern_of(pattern, wildcards)), part=sample(parts) if sample else parts
        )

    return files


def all_batches(pattern):
    """An input function: `pattern` ({batch}) for every batch job."""

    def files(wildcards):
        return expand(
            out(pattern), batch=planning.batch_names(part_names(), SHARDS_PER_JOB)
        )

    return files


def each_part(pattern, *before):
    """A params function: `pattern` with {part} kept for `--each-part` (a command line cannot
    list 10,000s of files), after the arguments `before` when there are any; a function,
    because Snakemake would fill a params string's {part} itself."""

    def value(wildcards):
        path = out(pattern_of(pattern, wildcards))
        return [*before, path] if before else path

    return value


def batch_files(pattern):
    """The files of one batch job: {part} = {batch} followed by each last-digit suffix."""
    return expand(
        out(pattern.replace("{part}", "{{batch}}{suffix}")), suffix=PART_SUFFIXES
    )


def batch_parts(wildcards):
    """The part names of one batch job."""
    return [wildcards.batch + suffix for suffix in PART_SUFFIXES]


def batch_of(pattern):
    """An input function: the files of one batch job for a pattern that is a function of the
    wildcards (batch_files for a fixed one)."""

    def files(wildcards):
        return [
            out(pattern_of(pattern, wildcards).replace("{part}", part))
            for part in batch_parts(wildcards)
        ]

    return files


def download_parts(wildcards, input):
    """The part files (in the split's folder) of one download job."""
    return [
        os.path.join(input[0], f"{part}.parquet") for part in batch_parts(wildcards)
    ]


def linked_shards(wildcards):
    """The user's tars and status tables of one link_shards job."""
    return wiring.linked_files(batch_parts(wildcards), SHARD_OF)


def shard_sources(wildcards):
    """The tar of each part of one link_shards job ("-" for a padding part)."""
    return [SHARD_OF.get(part, NO_SOURCE) for part in batch_parts(wildcards)]


def precomputed_embeddings(wildcards):
    """data.embeddings' files (names only; listed when the locate job is planned)."""
    return sources.embedding_paths(config["data"]["embeddings"])


def demo_pool_source(wildcards, input):
    """Where the demo pool's images come from: demo.image_dir, or the fetched packages."""
    if config["demo"]["image_dir"]:
        return ["--image-dir", config["demo"]["image_dir"]]
    return ["--source", input.source]


def demo_outputs():
    """The demo pool's files, when the run builds it (demo.enabled, no data.url_list)."""
    if not planning.uses_demo_pool(config):
        return []
    return [out("demo/urls.parquet"), out("demo/heldout.parquet")]


# ------------------------------------------------------------------ hygiene

# The drops files k-means (the screen's) and training (the screen's and near-duplicates') leave
# out (rules/hygiene.smk writes them).
SCREENED = [out("hygiene/screened.parquet")] if planning.uses_screen(config) else []
NEAR_DROPS = (
    expand(out("hygiene/near/{group}.parquet"), group=range(config["dedup"]["groups"]))
    if config["dedup"]["near"]
    else []
)


def screen_summary(wildcards, input):
    """`--screen` and the screen's summary, when the run screens."""
    return ["--screen", input.screen] if SCREENED else []


def near_duplicate_grid(wildcards, output):
    """The near-duplicate grid's arguments, when the run looks for near-duplicates."""
    if not config["dedup"]["near"]:
        return []
    return ["--out-grid", output.grid, "--shards", out("shards/{part}.tar")]


# ------------------------------------------------------------------ benchmarks

# Dataset name -> path, for the benchmarks that are configured (auto: the demo's held-out split,
# Debian's Fashion-MNIST). Those with no path (null, or the openclipart "auto" of a real run)
# are left out silently: nothing prints at parse time but errors, and dry runs and every
# cluster job parse this too. The evaluation, the protocols and the grid score on them.
EVALUATION_DATASETS, _ = planned(
    planning.evaluation_datasets, config, out("demo/heldout.parquet")
)
# A run that evaluates nothing stops here, before any job.
planned(planning.check_evaluation, config, EVALUATION_DATASETS)
FASHION_MNIST_MARKER = planning.fashion_mnist_marker(config["demo"]["resources_dir"])
# ... and what a job reading one waits for: unpack(by_wildcard(DATASET_INPUTS, "dataset")).
DATASET_INPUTS = wiring.evaluation_dataset_inputs(
    EVALUATION_DATASETS, out("demo/heldout.parquet"), FASHION_MNIST_MARKER
)
# Supervised fine-tuning (rules/finetune.smk) of finetune.models on the train split of each of
# finetune.datasets, evaluated like any model: the results evaluate_summary gathers.
FINETUNE_TRAIN_SPLITS = planned(
    planning.train_split_paths,
    config,
    "finetune",
    EVALUATION_DATASETS,
    out("demo/urls.parquet"),
)
FINETUNE_MODELS = config["finetune"]["models"] if FINETUNE_TRAIN_SPLITS else []


# ------------------------------------------------------------------ the ablation grid

# config.ablations' variants x seeds, each stage keyed by the settings it depends on
# (unicom.ablations.grid): the grid's jobs (`use rule ... as ablation_*` beside each main
# rule) read the run's own files where a variant changes nothing upstream.
GRID = planned(grid.plan, config)


def grid_options(stages, name):
    """Stage id -> config section `name` of the variant behind it, as its stage receives it."""
    return {key: as_json(section(variant, name)) for key, variant in stages.items()}


def grid_kmeans_launcher(wildcards, resources):
    """kmeans_launcher for the k-means settings of grid clustering {clustering}."""
    kmeans = GRID.clusterings[wildcards.clustering]["kmeans"]
    return planned(planning.kmeans_launcher, kmeans, dict(resources.items()))
