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


def url_list_files():
    """The URL-list Parquet files: the demo's, or the expanded data.url_list patterns."""
    if not config["data"]["url_list"]:
        return [out("demo/urls.parquet")]
    files = []
    for pattern in config["data"]["url_list"]:
        matches = sorted(glob.glob(pattern))
        if not matches:
            sys.exit(f"unicom: error: config key data.url_list: no file matches {pattern!r}")
        files.extend(matches)
    return files


def part_names():
    """Names of the URL-list parts (= shards), known once the split checkpoint ran."""
    parts_dir = checkpoints.split_urls.get().output[0]
    return sorted(Path(p).stem for p in glob.glob(os.path.join(parts_dir, "*.parquet")))
