"""The real Snakemake on the small test config: commands, job counts, and a test's config file.

A test's config is tests/configs/small.yaml with the test's own folders (the image folder, the
system root, output_dir ``results`` under its working directory) and changes, layered over the
demo's config/config.yaml as a user would layer a config: both files given, in that order (the
small config sets every key the demo's does, so the demo's file changes nothing; it is given so
that a test sees a key the demo's file gains before the small config has it).
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from helpers import REPO

DEMO_CONFIG = REPO / "config/config.yaml"
LAION_CONFIG = REPO / "config/laion400m.yaml"
# Runnable by hand from the repository root (its header says how); the tests' TEST_CONFIG.
SMALL_CONFIG = REPO / "tests/configs/small.yaml"


def tests_view(by_hand: dict) -> dict:
    """The small config as the tests use it: without the folders it names for a run by hand
    (a test gives its own image folder and system root), writing to ``results``."""
    config = copy.deepcopy(by_hand)
    config["output_dir"] = "results"
    del config["demo"]["image_dir"], config["demo"]["system_root"]
    return config


TEST_CONFIG = tests_view(yaml.safe_load(SMALL_CONFIG.read_text()))


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The pipeline with the demo config and the test's config.yaml on top of it."""
    return snakemake_with(workdir, [DEMO_CONFIG, workdir / "config.yaml"], *args, check=check)


def snakemake_command(workdir: Path, configfiles: list[Path], *args: str) -> list[str]:
    return [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
        "--cores", "2", *args, "--configfile", *map(str, configfiles),
    ]  # fmt: skip


def snakemake_with(
    workdir: Path, configfiles: list[Path], *args: str, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = snakemake_command(workdir, configfiles, *args)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rule -> job count of a dry run (empty when nothing is to be done)."""
    return job_counts(snakemake(workdir, "-n", *args))


def job_counts(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count of a run's "Job stats" (empty when nothing was to be done)."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", table, re.M) if m[0] != "total"}


def write_config(workdir: Path, image_dir: Path, **overrides) -> None:
    config = copy.deepcopy(TEST_CONFIG)
    config["demo"]["image_dir"] = str(image_dir)
    # Installed Debian packages are looked for here: a small Fashion-MNIST (the fixture).
    config["demo"]["system_root"] = str(workdir / "system")
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def laion_url_list(path: Path, urls: list[str]) -> Path:
    """A URL list in LAION's column layout."""
    rows = len(urls)
    pq.write_table(
        pa.table(
            {
                "SAMPLE_ID": list(range(rows)),
                "URL": urls,
                "TEXT": [f"caption {i}" for i in range(rows)],
                "LICENSE": ["?"] * rows,
                "NSFW": ["UNLIKELY"] * rows,
                "similarity": [0.3] * rows,
            }
        ),
        path,
    )
    return path
