import glob
import json

OUT = config["output_dir"]


wildcard_constraints:
    part=r"\d+",


def out(path):
    """Path of an artifact under the configured output folder."""
    return os.path.join(OUT, path)


def as_json(section):
    """A config section as one JSON string for `--options-json {params.options:q}`."""
    return json.dumps(section, sort_keys=True)


# Scheduler-only keys (and the gather-only ones for assign) stay out of the params, so that
# changing them does not rerun the computation.
SCHEDULER_KEYS = ("threads", "gpus", "mem_mb", "runtime")


def job_options(section, drop=SCHEDULER_KEYS):
    """The section as JSON without the keys that only concern the scheduler."""
    return as_json({k: v for k, v in section.items() if k not in drop})


def all_parts(pattern):
    return lambda wildcards: expand(out(pattern), part=part_names())


def url_list_files():
    """The URL-list Parquet files: the demo's, or the expanded data.url_list patterns."""
    if not config["data"]["url_list"]:
        return [out("demo/urls.parquet")]
    files = []
    for pattern in config["data"]["url_list"]:
        matches = sorted(glob.glob(pattern))
        if not matches:
            sys.exit(
                f"unicom: error: config key data.url_list: no file matches {pattern!r}"
            )
        files.extend(matches)
    return files


def part_names():
    """Names of the URL-list parts (= shards), known once the split checkpoint ran."""
    parts_dir = checkpoints.split_urls.get().output[0]
    return sorted(Path(p).stem for p in glob.glob(os.path.join(parts_dir, "*.parquet")))


def demo_outputs():
    if not (config["demo"]["enabled"] and not config["data"]["url_list"]):
        return []
    return [out("demo/urls.parquet"), out("demo/heldout.parquet")]


def demo_source_args(wildcards, input):
    if config["demo"]["image_dir"]:
        return ["--image-dir", config["demo"]["image_dir"]]
    return ["--source", input.source]
