import glob
import json
import re

from unicom import planning
from unicom.config import section

OUT = config["output_dir"]


wildcard_constraints:
    part=r"\d+",
    batch=r"\d+",


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


def part_names():
    """Names of the parts (= shards): data.shards' (rules/sources.smk, known at parse time),
    else the URL-list parts, known once the split checkpoint ran."""
    if SOURCE_PARTS:
        return SOURCE_PARTS
    parts_dir = checkpoints.split_urls.get().output[0]
    return sorted(Path(p).stem for p in glob.glob(os.path.join(parts_dir, "*.parquet")))


def all_parts(pattern, sample=None):
    """An input function: `pattern` for every part, or for the parts `sample(parts)` picks."""

    def files(wildcards):
        parts = part_names()
        return expand(out(pattern), part=sample(parts) if sample else parts)

    return files


def each_part(pattern):
    """`pattern` with {part} kept for `--each-part` (a command line cannot list 10,000s of
    files); a function, because Snakemake would fill a params string's {part} itself."""
    return lambda wildcards: out(pattern)


# Per-shard rules (download, embed, fuse, assign) run one job per batch of parts whose names
# share all but their last digits, so that 10,000 shards make 1,000 jobs per stage with 10 per
# job (Snakemake spends ~1 ms per job planning, and a scheduler wants fewer jobs too).
SHARDS_PER_JOB = config["download"]["shards_per_job"]
PART_SUFFIXES = planning.part_suffixes(SHARDS_PER_JOB)


def batch_files(pattern):
    """The files of one batch job: {part} = {batch} followed by each last-digit suffix."""
    return expand(
        out(pattern.replace("{part}", "{{batch}}{suffix}")), suffix=PART_SUFFIXES
    )


def demo_outputs():
    """The demo pool's files, when the run builds it (demo.enabled, no data.url_list)."""
    if not planning.uses_demo_pool(config):
        return []
    return [out("demo/urls.parquet"), out("demo/heldout.parquet")]


def grid_section(configs, key, name):
    """Section `name` of the ablation variant config behind stage id `key`, as JSON."""
    return as_json(section(configs[key], name))


def batch_parts(wildcards):
    """The part names of one batch job."""
    return [wildcards.batch + suffix for suffix in PART_SUFFIXES]


def files_of_batch(pattern, batch):
    """`pattern`'s files ({part} left in) of one batch job."""
    return [out(pattern.replace("{part}", batch + suffix)) for suffix in PART_SUFFIXES]


def train_split_inputs(name, train_paths):
    """What a job reading `name`'s train split waits for: the demo pool's URL list, or what
    its test split waits for (the same folder)."""
    path = train_paths[name]
    return {"train": path} if path == out("demo/urls.parquet") else DATASET_INPUTS[name]
