"""A user's bad input stops the real Snakemake run with one `unicom: error:` line on the console.

What the config and the URL list's Parquet footers can tell (a wrong column, an empty list, a
file that is not Parquet, kmeans.k above the rows) stops the run at parse time: no job starts
and no output folder appears. What only the downloads can tell (download.allowed_schemes that
rejects every URL) fails the download job with the likely cause; the profile's
show-failed-logs brings its line to the console, and nothing is embedded.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from helpers.workflow import DEMO_CONFIG, TEST_CONFIG, laion_url_list, snakemake_with

PROFILE = REPO / "profiles/local"
# Snakemake's header of a job it starts: "rule embed:", "localrule download:", ...
JOB_HEADER = re.compile(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):", re.M)


def write_config(workdir: Path, url_list: Path, **changes) -> list[Path]:
    """The demo config, and the test's small config on top with ``url_list`` in LAION's
    columns and ``changes`` merged into its sections."""
    config = json.loads(json.dumps(TEST_CONFIG))
    config["data"] = {"url_list": [str(url_list)], "url_col": "URL", "caption_col": "TEXT",
                      "extra_cols": ["SAMPLE_ID"]}  # fmt: skip
    config["assign"]["diagnostics"]["label_columns"] = []  # the demo's columns are not here
    for section, values in changes.items():
        config[section].update(values)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return [DEMO_CONFIG, workdir / "config.yaml"]


def run(workdir: Path, url_list: Path, *targets: str, **changes) -> subprocess.CompletedProcess:
    """The real snakemake under profiles/local with that config."""
    configs = write_config(workdir, url_list, **changes)
    return snakemake_with(workdir, configs, "--profile", str(PROFILE), *targets, check=False)


def console(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def the_error_line(result: subprocess.CompletedProcess) -> str:
    """The one `unicom: error:` line of the console (and the exit status: Snakemake's 1)."""
    assert result.returncode == 1, console(result)[-3000:]
    lines = [line for line in console(result).splitlines() if line.startswith("unicom: error:")]
    assert len(lines) == 1, console(result)[-3000:]
    return lines[0]


def assert_no_job_started(result: subprocess.CompletedProcess, workdir: Path) -> None:
    assert JOB_HEADER.findall(console(result)) == []
    assert "Job stats" not in console(result)
    assert not (workdir / "results").exists()


def urls(count: int) -> list[str]:
    return [f"https://example.org/{i}.jpg" for i in range(count)]


# --------------------------------------------------------------------------- parse time


@pytest.mark.parametrize(
    ("data", "column", "key"),
    [
        ({"url_col": "url"}, "url", "data.url_col"),
        ({"caption_col": "caption"}, "caption", "data.caption_col"),
        ({"extra_cols": ["SAMPLE_ID", "aesthetic"]}, "aesthetic", "data.extra_cols"),
    ],
)
def test_a_missing_column_stops_before_any_job(tmp_path, data, column, key):
    url_list = laion_url_list(tmp_path / "urls.parquet", urls(20))
    result = run(tmp_path, url_list, data=data)
    assert the_error_line(result) == (
        f"unicom: error: URL list {url_list}: no column '{column}' (config key {key}); "
        "it has SAMPLE_ID, URL, TEXT, LICENSE, NSFW, similarity"
    )
    assert_no_job_started(result, tmp_path)


def test_an_empty_url_list_stops_before_any_job(tmp_path):
    url_list = laion_url_list(tmp_path / "urls.parquet", [])
    result = run(tmp_path, url_list)
    assert (
        the_error_line(result)
        == "unicom: error: config key data.url_list: the URL list has no rows"
    )
    assert_no_job_started(result, tmp_path)


@pytest.mark.parametrize("name", ["urls.parquet", "urls.csv"])
def test_a_csv_url_list_stops_before_any_job(tmp_path, name):
    url_list = tmp_path / name
    url_list.write_text("URL,TEXT\n" + "".join(f"{url},a caption\n" for url in urls(20)))
    line = the_error_line(result := run(tmp_path, url_list))
    assert line.startswith(f"unicom: error: URL list {url_list}: not a Parquet file (")
    assert "convert it first (a CSV: pandas.read_csv(FILE).to_parquet(NEW_FILE))" in line
    assert_no_job_started(result, tmp_path)


@pytest.mark.parametrize(
    ("rows", "data", "message"),
    [
        (10, {}, "kmeans.k: 12 exceeds the 10 rows the run takes from data.url_list: k-means"),
        (
            30,
            {"max_rows": 10},
            "kmeans.k: 12 exceeds the 10 rows the run takes from data.url_list (data.max_rows)",
        ),
    ],
)
def test_k_above_the_url_lists_rows_stops_before_any_job(tmp_path, rows, data, message):
    url_list = laion_url_list(tmp_path / "urls.parquet", urls(rows))
    result = run(tmp_path, url_list, data=data, kmeans={"k": 12})
    assert the_error_line(result).startswith(f"unicom: error: config key {message}")
    assert_no_job_started(result, tmp_path)


def test_only_the_main_process_reads_the_footers(tmp_path):
    """A SLURM job's snakemake parses the Snakefile again (``--mode remote``, as the executor
    plugin starts it): it must not read every footer once more. The same empty list that stops
    the main process passes its parse there."""
    url_list = laion_url_list(tmp_path / "urls.parquet", [])
    assert "has no rows" in the_error_line(run(tmp_path, url_list))
    configs = write_config(tmp_path, url_list)
    job = snakemake_with(tmp_path, configs, "--mode", "remote", "-n", "split_urls", check=False)
    assert job.returncode == 0, console(job)[-3000:]
    assert "unicom: error" not in console(job)


# --------------------------------------------------------------------------- download time


def test_no_url_downloaded_fails_the_download_job_and_embeds_nothing(tmp_path, small_image_folder):
    """download.allowed_schemes [ftp] for a list of file:// URLs: every row rejected (0 %)."""
    images = sorted(small_image_folder.rglob("*.png"))[:12]
    url_list = laion_url_list(tmp_path / "urls.parquet", [image.as_uri() for image in images])
    result = run(tmp_path, url_list, "kmeans", download={"allowed_schemes": ["ftp"]})
    assert the_error_line(result) == (
        "unicom: error: download part 00000: 0 of 12 rows downloaded (0.0 %), below "
        "download.min_success_rate 0.2; likely cause: 12 rows not fetched: URL scheme 'file' "
        "not in download.allowed_schemes ['ftp'] (set download.allowed_schemes)"
    )
    # The job ran for real, and nothing that reads its shards did: the planned embed, fuse,
    # download_summary and k-means never started.
    started = set(JOB_HEADER.findall(console(result)))
    assert {"split_urls", "download"} <= started <= {"split_urls", "download", "prefetch_weights"}
    results = tmp_path / "results"
    assert not list(results.glob("shards/00000.*"))  # a failed job's outputs are removed
    assert not (results / "download/summary.json").exists()
    assert not list(results.glob("embed/*.parquet")) and not (results / "fused").exists()
