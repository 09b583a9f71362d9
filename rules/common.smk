import glob
import json
import random

from unicom.evaluate.benchmarks import FASHION_MNIST_DIR
from unicom.config import check_rehearsal_rows, section
from unicom.formats import batch_name
from unicom.data.split_urls import url_list_rows

OUT = config["output_dir"]


wildcard_constraints:
    part=r"\d+",
    batch=r"\d+",


def out(path):
    """Path of an artifact under the configured output folder."""
    return os.path.join(OUT, path)


def as_json(value):
    """A config section as one JSON string for `--options-json {params.options:q}`."""
    return json.dumps(value, sort_keys=True)


def stage_options(name):
    """The config section `name` as its stage receives it (JSON): keys the schema marks
    x-scheduler or x-planning stay out of the params, so changing them reruns nothing.
    """
    return as_json(section(config, name))


def all_parts(pattern):
    return lambda wildcards: expand(out(pattern), part=part_names())


def batch_names():
    """The per-shard jobs' batches: part names without their last digits."""
    return sorted({batch_name(part, SHARDS_PER_JOB) for part in part_names()})


def batch_parts(parts_dir, batch):
    """The part files of one batch job."""
    return [
        os.path.join(parts_dir, f"{batch}{suffix}.parquet") for suffix in PART_SUFFIXES
    ]


def diagnostic_parts():
    """The shards the cluster diagnostics read: all, or a seeded sample of max_shards."""
    parts = part_names()
    options = config["assign"]["diagnostics"]
    if len(parts) <= options["max_shards"]:
        return parts
    return sorted(random.Random(options["seed"]).sample(parts, options["max_shards"]))


def diagnostic_files(pattern):
    return lambda wildcards: expand(out(pattern), part=diagnostic_parts())


def each_part(pattern):
    """`pattern` with {part} kept for `--each-part` (a command line cannot list 10,000s of
    files); a function, because Snakemake would fill a params string's {part} itself."""
    return lambda wildcards: out(pattern)


# Per-shard rules (download, embed, fuse, assign) run one job per batch of parts whose names
# share all but their last digits, so that 10,000 shards make 1,000 jobs per stage with 10 per
# job (Snakemake spends ~1 ms per job planning, and a scheduler wants fewer jobs too).
SHARDS_PER_JOB = config["download"]["shards_per_job"]
BATCH_DIGITS = len(str(SHARDS_PER_JOB)) - 1
PART_SUFFIXES = [
    f"{i:0{BATCH_DIGITS}d}" if BATCH_DIGITS else "" for i in range(SHARDS_PER_JOB)
]


def batch_files(pattern):
    """The files of one batch job: {part} = {batch} followed by each last-digit suffix."""
    return expand(
        out(pattern.replace("{part}", "{{batch}}{suffix}")), suffix=PART_SUFFIXES
    )


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


def evaluation_models():
    """Model name -> what `unicom.evaluate --model` takes."""
    models = {"base": "base", "trained": out("train")}
    for path in config["evaluate"]["extra_models"]:
        models[os.path.basename(os.path.normpath(path))] = path
    return models


FASHION_MNIST_SYSTEM = str(FASHION_MNIST_DIR)  # where Debian's package installs it


def evaluation_datasets():
    """Dataset name -> path, for the benchmarks that are configured (auto = the demo's)."""
    datasets = {}
    for name, path in config["evaluate"]["datasets"].items():
        if path == "auto" and name == "openclipart":
            path = out("demo/heldout.parquet") if demo_outputs() else None
        elif path == "auto" and name == "fashion-mnist":
            # The system package, else the copy demo_fetch unpacks (openclipart demo only).
            fetched = os.path.join(
                config["demo"]["resources_dir"], "usr/share/datasets/fashion-mnist"
            )
            if os.path.isdir(FASHION_MNIST_SYSTEM):
                path = FASHION_MNIST_SYSTEM
            elif os.path.isdir(fetched) or (
                demo_outputs() and not config["demo"]["image_dir"]
            ):
                path = fetched
            else:
                path = None
        if path is None:
            print(
                f"unicom: evaluate: {name}: skipped, no path configured",
                file=sys.stderr,
            )
        elif path == "auto":
            sys.exit(
                f"unicom: error: config key evaluate.datasets.{name}: 'auto' only for the demo sets"
            )
        else:
            datasets[name] = path
    return datasets


def evaluate_inputs(wildcards):
    """The files an evaluate job reads: the model export and, for demo sets, their producer."""
    inputs = {}
    if wildcards.model == "trained":
        inputs["model"] = out("train/model.safetensors")
    elif wildcards.model == "base":
        # The base encoder's weights, fetched on the login node.
        inputs["encoder"] = out("embed/encoder.json")
    path = EVALUATION_DATASETS[wildcards.dataset]
    if path == out("demo/heldout.parquet"):
        inputs["dataset"] = path
    elif wildcards.dataset == "fashion-mnist" and not os.path.isdir(path):
        inputs["fetched"] = os.path.join(
            config["demo"]["resources_dir"], "demo_sources.json"
        )
    return inputs


def evaluation_targets():
    return expand(
        out("evaluate/{model}/{dataset}.json"),
        model=list(evaluation_models()),
        dataset=list(EVALUATION_DATASETS),
    )


def train_launcher(wildcards, resources):
    """The command that starts the ranks, as an argument list."""
    if resources.get("mpi"):
        # SLURM profiles set `mpi: srun`; the rule sets `nodes` and `tasks` (= nodes x
        # nproc_per_node): srun starts one rank per task, nproc_per_node on each node, and
        # SLURM's pre-timeout signal reaches every rank (torchrun would not forward SIGUSR1).
        # The counts must be explicit: the plugin drops the allocation's SLURM_NNODES and
        # SLURM_NTASKS from the command's environment, and a bare srun would start one rank.
        return [
            resources.mpi,
            "--nodes",
            str(resources.nodes),
            "--ntasks",
            str(resources.tasks),
            "--ntasks-per-node",
            str(int(config["train"]["nproc_per_node"])),
            "python",
            "-m",
            "unicom.train.train",
        ]
    if int(config["train"]["nodes"]) > 1:
        sys.exit(
            "unicom: error: config key train.nodes: above 1 needs a SLURM profile that sets "
            "mpi: srun for train (torchrun --standalone runs on one node)"
        )
    nproc = int(config["train"]["nproc_per_node"])
    if nproc > 1:
        return [
            "torchrun",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "unicom.train.train",
        ]
    return ["python", "-m", "unicom.train.train"]
