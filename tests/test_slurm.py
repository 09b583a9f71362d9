"""The pipeline on a real SLURM cluster: one node on loopback (tests/slurm/start.sh), the
profiles/slurm-ci profile and the small demo of tests/test_workflow.py, end to end (rule all):
download, embedding, clustering, training with 2 ranks that srun starts in one SLURM job,
evaluation, summary and plots.

Needs root and a Debian system (the harness installs Debian's slurm-wlm packages and starts
munged, slurmctld and slurmd); skipped elsewhere, with the reason. UNICOM_SLURM=skip skips
these tests; UNICOM_SLURM=require (CI) makes a cluster that cannot start a failure, not a skip.
The cluster is stopped at the end of the session, whatever happened.

The snakemake plugin polls SLURM 1, 12, 33 ... s after a submission (profiles/slurm-ci), so
each stage costs ~12-30 s beyond its work, and a run that ends with a failed job waits one more
interval before it exits. The module takes 6-8 minutes on 2 cores (6 min 14 s last measured;
5 snakemake runs, 25 SLURM jobs).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import REPO
from helpers.workflow import DEMO_CONFIG, write_config
from readme import check_result, readme_block, run_block

pytestmark = pytest.mark.slow

HARNESS = REPO / "tests/slurm"
PROFILE = REPO / "profiles/slurm-ci"
PARTS = ("00000", "00001", "00002")  # 36 training images, 12 per shard
# What the demo runs ask for: everything (clustering, training, evaluation, table and plots).
DAG_TARGETS = ("all",)
# Training with 2 ranks, which srun starts in one SLURM job (the profile's `mpi: srun`). One
# core each: train.threads becomes sbatch --cpus-per-task, and the test node has 2 cores.
TRAIN = {"nproc_per_node": 2, "threads": 1}
FAILING = ("embed", "00001")
# The held-out openclipart split only: test_workflow.py evaluates on Fashion-MNIST too.
OPENCLIPART_ONLY = {"datasets": {"fashion-mnist": None}}
BASE_EVAL = ("evaluate", "model=base, dataset=openclipart")
TRAINED_EVAL = ("evaluate", "model=trained, dataset=openclipart")
# Rules the workflow runs on the login node (localrules), never as SLURM jobs.
LOCAL_RULES = {
    "all",
    "demo_fetch",
    "demo_pool",
    "split_urls",
    "prefetch_weights",
    "download_summary",
    "evaluate_summary",
    "report_plots",
    "effective_config",
}
# Jobs (rule, part or wildcards) of each run.
# What follows new assignments: the sizes and diagnostics, training, the trained model's
# evaluation, the table and the plots.
AFTER_ASSIGN = Counter(
    {
        ("cluster_report", None): 1,
        ("cluster_diagnostics", None): 1,
        ("train", None): 1,
        TRAINED_EVAL: 1,
        ("evaluate_summary", None): 1,
        ("report_plots", None): 1,
        ("all", None): 1,
    }
)
# What follows one changed shard's vectors: k-means over all shards, then every assignment.
AFTER_FUSE = (
    Counter({("kmeans", None): 1, **{("assign", part): 1 for part in PARTS}}) + AFTER_ASSIGN
)
# The run with one shard's embed failing: everything that does not need that shard (keep-going;
# the base model's evaluation reads only the held-out images), and that shard's fuse, submitted
# in its embed's allocation (the group fails before it starts).
BROKEN_JOBS = Counter(
    {
        ("demo_pool", None): 1,
        ("split_urls", None): 1,
        ("prefetch_weights", None): 1,
        **{(rule, part): 1 for rule in ("download", "embed", "fuse") for part in PARTS},
        ("download_summary", None): 1,
        # every row's fate (here: the download's statuses; the test config has no hygiene)
        ("hygiene_report", None): 1,
        BASE_EVAL: 1,
        ("effective_config", None): 1,
    }
)
# The rerun: that shard's embed and fuse, and what follows.
MENDED_JOBS = Counter({("embed", "00001"): 1, ("fuse", "00001"): 1}) + AFTER_FUSE
# --forcerun assign up to the cluster sizes: the assignments (one group job) and the sizes.
# (What follows them locally: test_workflow.py's forcerun test retrains and re-evaluates.)
FORCERUN_JOBS = Counter({("assign", part): 1 for part in PARTS} | {("cluster_report", None): 1})
# Training interrupted by SIGUSR1: tiny steps (32 px, 2 images per rank), many of them, so that
# it still runs when the signal comes and the rest costs seconds. No periodic checkpoint: the
# one found afterwards is the one the signal made.
SIGNAL_TRAIN = {
    "steps": 150,
    "image_size": 32,
    "batch_size": 2,
    "log_every": 1,
    "checkpoint_every": 1000,
}
SNAKEMAKE_TIMEOUT_S = 480


# ------------------------------------------------------------------------------ the cluster
def skip_or_fail(reason: str) -> None:
    if os.environ.get("UNICOM_SLURM") == "require":
        pytest.fail(f"UNICOM_SLURM=require, but {reason}")
    pytest.skip(reason)


def why_not_here() -> str | None:
    """Why this machine cannot run the local cluster, or None."""
    if os.environ.get("UNICOM_SLURM") == "skip":
        return "UNICOM_SLURM=skip"
    if os.geteuid() != 0:
        return "needs root: tests/slurm/start.sh installs slurm-wlm and starts its daemons"
    if not Path("/etc/debian_version").exists() or not shutil.which("apt-get"):
        return "needs Debian (12): tests/slurm/start.sh installs slurm-wlm with apt-get"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e .)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node cluster; stopped (by PID, tests/slurm/stop.sh) at session end."""
    reason = why_not_here()
    if reason:
        skip_or_fail(reason)
    try:
        started = subprocess.run(
            ["bash", str(HARNESS / "start.sh")], capture_output=True, text=True, timeout=900
        )
        if started.returncode != 0:
            lines = started.stderr.strip().splitlines() or ["(no output)"]
            skip_or_fail(f"SLURM did not start: {lines[-1]}")
        yield
    finally:
        subprocess.run(["bash", str(HARNESS / "stop.sh")], capture_output=True, timeout=120)


# ------------------------------------------------------------------------- runs and their logs
def without_shown_logs(console: str) -> str:
    """The console without the log files that show-failed-logs prints (the profile sets it): a
    failed group's SLURM log holds the job blocks of the snakemake inside the allocation, whose
    job ids are not the run's."""
    kept: list[str] = []
    lines = iter(console.splitlines())
    for line in lines:
        kept.append(line)
        if line.startswith("Logfile ") and line.endswith(":"):
            separator = next(lines, "")
            if separator and set(separator) == {"="}:
                next((inner for inner in lines if inner == separator), None)  # skip the body
            else:
                kept.append(separator)
    return "\n".join(kept)


@dataclass
class Run:
    returncode: int
    log: str

    def jobs(self) -> Counter[tuple[str, str | None]]:
        """(rule, part) of every job snakemake ran or submitted (in a group), from its job blocks;
        for jobs without a part, their wildcards (None without any).

        Blocks are keyed by job id: an error report repeats a started job's block.
        """
        started: dict[str, tuple[str, str | None]] = {}
        lines = without_shown_logs(self.log).splitlines()
        for i, line in enumerate(lines):
            header = re.match(r"\s*(?:local)?(?:rule|checkpoint) (\w+):$", line)
            if not header:
                continue
            fields: dict[str, str] = {}
            for field in lines[i + 1 :]:
                match = re.match(r"\s+(\w+): (.*)$", field)
                if not match:
                    break
                fields.setdefault(match.group(1), match.group(2))
            wildcards = fields.get("wildcards")
            # Per-shard jobs name their shard `part`, or `batch` where one job takes several.
            part = re.search(r"\b(?:part|batch)=(\d+)", wildcards or "")
            key = part.group(1) if part else wildcards
            job = fields.get("jobid", f"line {i}")
            if key or job not in started:
                started[job] = (header.group(1), key)
        return Counter(started.values())

    def rules(self) -> Counter[str]:
        return Counter(rule for rule, _ in self.jobs().elements())

    def submissions(self) -> dict[str, str]:
        """SLURM job id -> what it ran (rule_<name> or group_<name>_<rules>)."""
        found = re.findall(
            r"submitted with SLURM jobid (\d+) \(log: .*?/slurm_logs/(\w+)/", self.log
        )
        return dict(found)


def snakemake_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    # Jobs run `python -m unicom.<stage>`: this interpreter's environment must come first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def snakemake_command(workdir: Path, targets: Sequence[str], *options: str) -> list[str]:
    """The pipeline in ``workdir`` (its config.yaml) through the slurm-ci profile."""
    # Targets first: --configfile and --group-components would swallow what follows them.
    # SIGINT is what makes snakemake cancel its SLURM jobs and stop; KILL 30 s later if not.
    return [
        "timeout", "-s", "INT", "-k", "30", str(SNAKEMAKE_TIMEOUT_S),
        sys.executable, "-m", "snakemake", *targets, "-s", str(REPO / "Snakefile"),
        "-d", str(workdir), "--profile", str(PROFILE),
        "--configfile", str(DEMO_CONFIG), str(workdir / "config.yaml"), *options,
    ]  # fmt: skip


def snakemake_slurm(
    workdir: Path,
    label: str,
    *options: str,
    targets: Sequence[str] = DAG_TARGETS,
    env: dict | None = None,
) -> Run:
    """``targets`` through the slurm-ci profile; the output is kept as <workdir>/<label>.log."""
    result = subprocess.run(
        snakemake_command(workdir, targets, *options),
        env=env or snakemake_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=SNAKEMAKE_TIMEOUT_S + 60,
    )
    (workdir / f"{label}.log").write_text(result.stdout)
    return Run(result.returncode, result.stdout)


def slurm_states(job_ids) -> dict[str, str]:
    """State of each job as slurmctld remembers it (MinJobAge keeps finished jobs listed)."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %T"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split() for line in out.splitlines())


def mtimes(results: Path) -> dict[str, int]:
    return {
        str(p.relative_to(results)): p.stat().st_mtime_ns
        for p in results.rglob("*")
        if p.is_file() and "logs" not in p.parts and "benchmarks" not in p.parts
    }


def tail(run: Run, chars: int = 3000) -> str:
    return run.log[-chars:]


def only_submission(run: Run, kind: str) -> str:
    """The SLURM job id of the one job of this kind (e.g. rule_train) that ``run`` submitted."""
    ids = [job for job, what in run.submissions().items() if what == kind]
    assert len(ids) == 1, (kind, run.submissions())
    return ids[0]


# ------------------------------------------------------------------ the demo, broken and mended
@dataclass
class DemoRuns:
    workdir: Path
    broken: Run  # the first run, with one shard's embed job failing
    failed_job_log: str  # that job's log (the rerun writes the same file again)
    mended: Run  # the rerun
    after_broken: dict[str, int]  # output mtimes after each run
    after_mended: dict[str, int]


def group_components(**overrides: int) -> list[str]:
    """The profile's --group-components with some groups changed (the option replaces them all)."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    components = {**profile["group-components"], **overrides}
    return ["--group-components", *(f"{group}={n}" for group, n in components.items())]


@pytest.fixture(scope="module")
def demo_runs(slurm_cluster, tmp_path_factory, small_image_folder) -> DemoRuns:
    """The demo DAG with one shard's embed failing once, then the rerun that completes it.

    Each shard's embed runs in its own allocation here (embed=1), so that the failure stops
    nothing but that shard; in a group of several shards, snakemake inside the allocation stops
    starting members after the first failure, and those then run on the rerun too.
    """
    workdir = tmp_path_factory.mktemp("slurm-demo")
    write_config(workdir, small_image_folder, train=TRAIN, evaluate=OPENCLIPART_ONLY)
    marker = workdir / "fail-once"
    marker.write_text(" ".join(FAILING))
    args = group_components(embed=1)
    env = snakemake_env(UNICOM_FAIL_ONCE=str(marker))

    broken = snakemake_slurm(workdir, "broken", *args, env=env)
    hook = "does unicom.embed call unicom.faults.fail_once_if_marked?"
    assert not marker.exists(), f"embed never consumed the fault marker: {hook}"
    assert broken.returncode != 0, f"the injected failure did not happen:\n{tail(broken)}"
    after_broken = mtimes(workdir / "results")
    failed_job_log = (workdir / "results/logs/embed/00001.log").read_text()

    mended = snakemake_slurm(workdir, "mended", *args)
    assert mended.returncode == 0, f"the rerun failed:\n{tail(mended)}"
    after_mended = mtimes(workdir / "results")
    return DemoRuns(workdir, broken, failed_job_log, mended, after_broken, after_mended)


def test_demo_runs_end_to_end_as_slurm_jobs(demo_runs):
    results = demo_runs.workdir / "results"
    for part in PARTS:
        fused = pq.read_table(results / f"fused/{part}.parquet")
        labels = pq.read_table(results / f"assign/{part}.parquet")
        assert labels.column("key").to_pylist() == fused.column("key").to_pylist()
    sizes = json.loads((results / "clusters/sizes.json").read_text())
    assert sizes["samples"] == 36
    assert json.loads((results / "download/summary.json").read_text())["counts"]["success"] == 36
    rows = (results / "evaluate/summary.csv").read_text().splitlines()
    assert sorted({row.split(",")[1] for row in rows[1:]}) == ["base", "trained"]
    for png in ("download", "kmeans", "training", "retrieval"):
        assert (results / f"report/{png}.png").read_bytes()[:4] == b"\x89PNG"

    # Every cluster job was a real SLURM job: slurmctld knows each id the log names.
    submitted = {**demo_runs.broken.submissions(), **demo_runs.mended.submissions()}
    states = slurm_states(submitted)
    assert set(states) == set(submitted)
    failed = [job for job, state in states.items() if state != "COMPLETED"]
    assert [submitted[job] for job in failed] == ["group_embed_embed_fuse"], states
    # Groups: the three shards' downloads shared one allocation, and so did their assignments.
    broken_kinds = Counter(demo_runs.broken.submissions().values())
    assert (
        demo_runs.broken.rules()["download"] == 3 and broken_kinds["group_download_download"] == 1
    )
    mended_kinds = Counter(demo_runs.mended.submissions().values())
    assert demo_runs.mended.rules()["assign"] == 3 and mended_kinds["group_assign_assign"] == 1
    cluster_jobs = sum(
        n for (rule, _), n in demo_runs.mended.jobs().items() if rule not in LOCAL_RULES
    )
    assert len(demo_runs.mended.submissions()) < cluster_jobs
    # Local rules ran on the "login node": no SLURM job of theirs.
    kinds = set(submitted.values())
    assert not {kind for kind in kinds if kind.removeprefix("rule_") in LOCAL_RULES}, kinds
    print(
        f"\nSLURM jobs: broken run {len(demo_runs.broken.submissions())}, mended run "
        f"{len(demo_runs.mended.submissions())}: {sorted(Counter(submitted.values()).items())}"
    )


def test_the_readme_finds_a_runs_slurm_jobs_by_its_run_id(demo_runs):
    """The docs' commands for the jobs of a killed run (block id=slurm-cancel), as written,
    in the run's folder: the run ID from Snakemake's log, then squeue and scancel by it."""
    block = readme_block("slurm-cancel")
    shown = dataclasses.replace(block, text=block.text + 'echo "run id: $RUN_ID"\n')
    result = run_block(shown, demo_runs.workdir, {})
    assert check_result(shown, result) == []
    run_id = re.search(r"^run id: (\S+)$", result.stdout, re.M)
    assert run_id and run_id.group(1) in (demo_runs.workdir / "mended.log").read_text()
    assert "JOBID" in result.stdout  # squeue's header: the run's jobs (none left) listed


def test_training_ran_two_ranks_in_one_slurm_job(demo_runs):
    """train.nproc_per_node = 2 under the profile's `mpi: srun`: one SLURM job, in which srun
    started two ranks that found each other through SLURM's environment and trained as one."""
    results = demo_runs.workdir / "results"
    job_id = only_submission(demo_runs.mended, "rule_train")
    assert slurm_states([job_id]) == {job_id: "COMPLETED"}
    log = (results / "logs/train.log").read_text()
    for rank in (0, 1):
        assert re.search(rf"rank {rank}/2 \(slurm\): gloo rendezvous at ", log), log[-3000:]
    assert re.search(r"\d+ steps of \d+ samples .*, 2 ranks on cpu", log), log[-3000:]
    # Each rank read its own shards (the trainer splits them over the ranks), every one read.
    data = json.loads((results / "train/data.json").read_text())
    assert sorted(data["shards"]) == list(PARTS)
    assert {shard["rank"] for shard in data["shards"].values()} == {0, 1}
    assert data["shards_never_read"] == 0
    assert data["totals"]["kept"] == data["totals"]["tar_samples"] == 36
    info = json.loads((results / "train/model.json").read_text())
    assert info["training"]["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (results / "train/metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]


def test_failed_shard_reruns_alone_with_what_follows(demo_runs):
    broken, mended = demo_runs.broken, demo_runs.mended
    assert "failing once on purpose" in demo_runs.failed_job_log
    assert broken.jobs() == BROKEN_JOBS, sorted(broken.jobs().items())
    assert mended.jobs() == MENDED_JOBS, sorted(mended.jobs().items())
    # Everything the broken run finished was kept: same files, same modification times.
    before, after = demo_runs.after_broken, demo_runs.after_mended
    assert "shards/00001.tar" in before and "embed/00000.parquet" in before
    assert "evaluate/base/openclipart.json" in before
    assert {name for name in before if after.get(name) != before[name]} == set()
    print(f"\nrerun after the failure: {sorted(mended.jobs().items())}")


def test_forcerun_assign_regenerates_the_assignments_in_one_group_job(demo_runs):
    workdir = demo_runs.workdir
    results = workdir / "results"
    before = {part: pq.read_table(results / f"assign/{part}.parquet") for part in PARTS}
    before_mtimes = mtimes(results)

    run = snakemake_slurm(workdir, "forcerun", "--forcerun", "assign", targets=("cluster_report",))
    assert run.returncode == 0, tail(run)
    assert run.jobs() == FORCERUN_JOBS, sorted(run.jobs().items())
    assert Counter(run.submissions().values())["group_assign_assign"] == 1
    after = mtimes(results)
    changed = {name for name in after if after[name] != before_mtimes.get(name)}
    assert {f"assign/{part}.parquet" for part in PARTS} | {"clusters/sizes.json"} <= changed
    assert all(
        not name.startswith(
            ("parts/", "shards/", "embed/", "fused/", "kmeans/", "train/", "evaluate/")
        )
        for name in changed
    )
    for part in PARTS:  # the same labels again: assign is deterministic
        assert pq.read_table(results / f"assign/{part}.parquet").equals(before[part])
    jobs = len(run.submissions())
    print(f"\n--forcerun assign ran: {sorted(run.jobs().items())}, SLURM jobs {jobs}")


# --------------------------------------------------------------------------------- training
def test_sigusr1_checkpoints_and_the_rerun_resumes(demo_runs, small_image_folder):
    """SLURM's warning before the time limit (--signal=USR1@T, no B:) is SIGUSR1 to the job
    steps: both ranks save a checkpoint at the step boundary and exit 128 + 10, the job fails,
    and the rerun resumes from that checkpoint and completes."""
    workdir = demo_runs.workdir
    out_dir = workdir / "results/train"
    steps = SIGNAL_TRAIN["steps"]
    # Other settings: the rule reruns, and the trainer sets the demo run's checkpoints aside.
    write_config(
        workdir, small_image_folder, train={**TRAIN, **SIGNAL_TRAIN}, evaluate=OPENCLIPART_ONLY
    )
    live = out_dir / "metrics.partial.jsonl"  # rank 0 appends a line per step
    live.unlink(missing_ok=True)
    log_path = workdir / "signalled.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            snakemake_command(workdir, ("train",)),
            env=snakemake_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + SNAKEMAKE_TIMEOUT_S
            while not (live.is_file() and live.read_text().strip()):
                assert process.poll() is None, f"ended early:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "training never finished a step"
                time.sleep(0.2)
            job_id = only_submission(Run(0, log_path.read_text()), "rule_train")
            # What --signal=USR1@T (no B:) does at T s before the limit: signal the job steps.
            subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
            returncode = process.wait(timeout=SNAKEMAKE_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.terminate()  # timeout passes it on; snakemake cancels its job
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
    signalled = Run(returncode, log_path.read_text())
    train_log = (workdir / "results/logs/train.log").read_text()
    assert returncode != 0, tail(signalled)
    assert slurm_states([job_id]) == {job_id: "FAILED"}
    # Both ranks stopped after the same step, and that step's checkpoint is the only one.
    usr1 = int(signal.SIGUSR1)
    stopped = re.findall(rf"stopped by signal {usr1} after step (\d+)", train_log)
    assert len(stopped) == 2 and len(set(stopped)) == 1, train_log[-3000:]
    step = int(stopped[0])
    assert 1 <= step < steps
    checkpoint = out_dir / f"checkpoints/step-{step:08d}"
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == [checkpoint.name]
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "model.pt",
        "rank-00000.pt",
        "rank-00001.pt",
    ]

    resumed = snakemake_slurm(workdir, "resumed", targets=("train",))
    assert resumed.returncode == 0, tail(resumed)
    assert resumed.jobs() == Counter({("train", None): 1}), sorted(resumed.jobs().items())
    resumed_id = only_submission(resumed, "rule_train")
    assert slurm_states([resumed_id]) == {resumed_id: "COMPLETED"}
    train_log = (workdir / "results/logs/train.log").read_text()
    assert re.search(rf"resuming from \S*{checkpoint.name} \(step {step} of {steps}\)", train_log)
    logged = [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").open()]
    assert logged == list(range(1, steps + 1))
    info = json.loads((out_dir / "model.json").read_text())
    assert info["training"]["steps"] == steps and info["training"]["world_size"] == 2
    print(f"\nSIGUSR1 after step {step} of {steps}; resumed there in SLURM job {resumed_id}")


# Last in the module: it changes the kmeans settings of the demo run's folder.
def test_torch_kmeans_runs_two_srun_ranks_in_one_slurm_job(demo_runs):
    """kmeans.backend: torch with 2 ranks: one SLURM job in which srun starts both (the
    `mpi: srun` a profile sets for kmeans when it runs more than one rank)."""
    workdir = demo_runs.workdir
    kmeans = "kmeans={backend: torch, nproc_per_node: 2, init: random, threads: 1, device: cpu}"
    run = snakemake_slurm(
        workdir, "torch-kmeans", "--forcerun", "kmeans", "--config", kmeans,
        "--set-resources", "kmeans:mpi=srun", "kmeans:tasks_per_gpu=1",
        targets=("results/kmeans/centroids.npy",),
    )  # fmt: skip
    assert run.returncode == 0, tail(run)
    assert run.jobs() == Counter({("kmeans", None): 1}), sorted(run.jobs().items())
    job_id = only_submission(run, "rule_kmeans")
    assert slurm_states([job_id]) == {job_id: "COMPLETED"}
    log = (workdir / "results/logs/kmeans.log").read_text()
    for rank in (0, 1):
        assert re.search(rf"rank {rank}/2 \(slurm\): gloo rendezvous at ", log), log[-3000:]
    stats = json.loads((workdir / "results/kmeans/kmeans.json").read_text())
    assert stats["backend"] == "torch" and stats["ranks"] == 2 and stats["sample_size"] == 36
    centroids = np.load(workdir / "results/kmeans/centroids.npy")
    assert centroids.shape[0] == 4 and np.isfinite(centroids).all()
