"""How long Snakemake takes to plan the whole DAG at 10,000 shards (goal: `snakemake -n` < 20 s).

Builds a working folder with a URL list of 10,000 http URLs, runs the real `split_urls`
checkpoint on it with shard_size 1 (10,000 parts, as a LAION-sized run would have) and
download.shards_per_job 10 (the per-shard stages run 1,000 jobs each), then times
`snakemake -n` of the default target -- every stage of every shard -- and prints the seconds and
the number of jobs planned. Nothing is downloaded.

Every snakemake start also pays for its plugins' start-up, which the script times apart
(`snakemake --version`): the SLURM plugin runs `scontrol show config`, which waits ~9 s on a
machine that has SLURM's client but no reachable controller.

    python bench/dag.py                     # 10,000 parts (split ~1 min, then the timings)
    python bench/dag.py --parts 2000        # quicker
    python bench/dag.py --shards-per-job 1  # one job per shard and stage (40,000 jobs)
    python bench/dag.py --workdir /tmp/dag  # keep the folder: a second call skips the split
    python bench/dag.py --profile 30        # also cProfile one dry run; top 30 functions
    python bench/dag.py --snakefile /tmp/try/Snakefile   # time a changed copy of the workflow
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 20.0


def url_table(rows: int) -> pa.Table:
    """``rows`` distinct http URLs with captions (never fetched)."""
    return pa.table(
        {
            "url": [f"http://example.invalid/img/{i:07d}.jpg" for i in range(rows)],
            "caption": [f"image number {i}" for i in range(rows)],
        }
    )


def bench_config(url_list: Path, shards_per_job: int) -> dict:
    """The pipeline config of the benchmark: the URL list above, one row per part."""
    return {
        "output_dir": "results",
        "demo": {"enabled": False},
        "data": {"url_list": [str(url_list)], "extra_cols": []},
        "download": {"shard_size": 1, "shards_per_job": shards_per_job},
    }


def planned_jobs(text: str) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    if "Job stats:" not in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)}


def snakemake_command(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile") -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(snakefile),
        "-d",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        "1",
        *args,
    ]


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (less sensitive to other load on the machine), output."""
    start, cpu_start = time.perf_counter(), child_cpu_seconds()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - start, child_cpu_seconds() - cpu_start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return seconds, cpu, output


def prepare(workdir: Path, parts: int, shards_per_job: int) -> float:
    """URL list + config + the real split_urls checkpoint; seconds spent splitting (0 if done)."""
    manifest = workdir / "results/parts/manifest.json"
    url_list = workdir / "urls.parquet"
    if (
        manifest.exists()
        and pq.read_metadata(url_list).num_rows == parts
        and json.loads(manifest.read_text()).get("shards_per_job", 1) == shards_per_job
    ):
        return 0.0
    workdir.mkdir(parents=True, exist_ok=True)
    pq.write_table(url_table(parts), url_list)
    (workdir / "config.yaml").write_text(yaml.safe_dump(bench_config(url_list, shards_per_job)))
    seconds, _, _ = run(snakemake_command(workdir, "split_urls"))
    return seconds


def profile_dry_run(workdir: Path, snakefile: Path, top: int) -> str:
    """cProfile of one in-process `snakemake -n --quiet`; the top functions by own time."""
    from snakemake.cli import main as snakemake_main

    profiler = cProfile.Profile()
    argv = snakemake_command(workdir, "--dry-run", "--quiet", "rules", snakefile=snakefile)[3:]
    cwd = os.getcwd()
    try:
        profiler.enable()
        try:
            snakemake_main(argv)
        except SystemExit:
            pass
        finally:
            profiler.disable()
    finally:
        os.chdir(cwd)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=int, default=10_000, help="URL-list parts (= shards)")
    parser.add_argument(
        "--shards-per-job", type=int, default=10, help="download.shards_per_job (1, 10, 100)"
    )
    parser.add_argument("--workdir", help="working folder to use and keep (default: a temp one)")
    parser.add_argument("--repeats", type=int, default=1, help="timed dry runs (best, median)")
    parser.add_argument("--profile", type=int, metavar="TOP", default=0, help="cProfile top N")
    parser.add_argument("--snakefile", default=str(REPO / "Snakefile"), help="workflow to time")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="unicom-dag-") as tmp:
        workdir = Path(args.workdir).resolve() if args.workdir else Path(tmp)
        split_s = prepare(workdir, args.parts, args.shards_per_job)
        startup_s, startup_cpu, _ = run([sys.executable, "-m", "snakemake", "--version"])
        if split_s:
            print(f"split_urls: {args.parts} parts in {split_s:.1f} s")

        timings: dict[str, list[tuple[float, float]]] = {
            "snakemake -n": [],
            "snakemake -n --quiet": [],
        }
        jobs: dict[str, int] = {}
        for _ in range(args.repeats):
            for label, extra in (("snakemake -n", ()), ("snakemake -n --quiet", ("--quiet",))):
                command = snakemake_command(workdir, "-n", *extra, snakefile=Path(args.snakefile))
                seconds, cpu, output = run(command)
                timings[label].append((seconds, cpu))
                jobs = planned_jobs(output) or jobs
        total = jobs.pop("total", sum(jobs.values()))
        print(
            f"parts: {args.parts}   jobs planned: {total}   ({', '.join(map(str, jobs.items()))})"
        )
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(
            f"snakemake start-up alone (--version): wall {startup_s:.1f} s, cpu {startup_cpu:.1f} s"
            " (included below)"
        )
        for label, values in timings.items():
            walls, cpus = [wall for wall, _ in values], [cpu for _, cpu in values]
            best = min(walls)
            verdict = "ok" if best < GOAL_S else "SLOW"
            print(
                f"{label:22s} wall best {best:6.1f} s  median {statistics.median(walls):6.1f} s"
                f"  cpu best {min(cpus):6.1f} s  (goal < {GOAL_S:.0f} s: {verdict})"
            )
        if args.profile:
            print(profile_dry_run(workdir, Path(args.snakefile), args.profile))


if __name__ == "__main__":
    main()
