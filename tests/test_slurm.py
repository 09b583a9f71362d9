"""The pipeline on a real SLURM cluster: one node on loopback (tests/slurm/start.sh), the
profiles/slurm-ci profile and the small demo of tests/test_workflow.py.

Needs root and a Debian system (the harness installs Debian's slurm-wlm packages and starts
munged, slurmctld and slurmd); skipped elsewhere, with the reason. UNICOM_SLURM=skip skips
these tests; UNICOM_SLURM=require (CI) makes a cluster that cannot start a failure, not a skip.
The cluster is stopped at the end of the session, whatever happened.

The snakemake plugin polls SLURM every 5-40 s, so each stage costs ~20 s beyond its work; the
module takes 4-5 minutes (4 min 15 s on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from test_workflow import write_config

from conftest import REPO

HARNESS = REPO / "tests/slurm"
PROFILE = REPO / "profiles/slurm-ci"
PARTS = ("00000", "00001", "00002")  # 36 training images, 12 per shard
# What the demo runs ask for. Add "train" (and "evaluate_summary", with "train", "evaluate" in
# AFTER_FUSE) once rules/train.smk starts its ranks with srun under this profile (see FIXME in
# the TRAIN_* lines) and test_workflow.TEST_CONFIG has test-sized train settings.
DAG_TARGETS = ("download_summary", "cluster_sizes", "cluster_diagnostics")
# Rules that read the fused vectors of every shard: one changed shard reruns all of them.
AFTER_FUSE = {"kmeans", "assign", "cluster_sizes", "cluster_diagnostics"}
FAILING = ("embed", "00001")
# The training launch. FIXME: a stand-in rule named `train` (the profile's train entry applies
# to it) until rules/train.smk launches `{resources.mpi} -n {resources.tasks}` when the profile
# sets `mpi`; then the pipeline's Snakefile, target "train", with train.nproc_per_node = 2.
TRAIN_SNAKEFILE = HARNESS / "train_probe.smk"
TRAIN_TARGETS = ("train",)
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
@dataclass
class Run:
    returncode: int
    log: str

    def jobs(self) -> Counter[tuple[str, str | None]]:
        """(rule, part) of every job snakemake ran or submitted (in a group), from its job blocks.

        Blocks are keyed by job id: an error report repeats a started job's block.
        """
        started: dict[str, tuple[str, str | None]] = {}
        lines = self.log.splitlines()
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
            part = re.search(r"\bpart=(\d+)", fields.get("wildcards", ""))
            job = fields.get("jobid", f"line {i}")
            if part or job not in started:
                started[job] = (header.group(1), part.group(1) if part else None)
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


def snakemake_command(
    workdir: Path, snakefile: Path, targets: Sequence[str], *options: str
) -> list[str]:
    # Targets first: --configfile and --group-components would swallow what follows them.
    # SIGINT is what makes snakemake cancel its SLURM jobs and stop; KILL 30 s later if not.
    return [
        "timeout", "-s", "INT", "-k", "30", str(SNAKEMAKE_TIMEOUT_S),
        sys.executable, "-m", "snakemake", *targets, "-s", str(snakefile), "-d", str(workdir),
        "--profile", str(PROFILE), *options,
    ]  # fmt: skip


def snakemake_slurm(workdir: Path, label: str, *options: str, env: dict | None = None) -> Run:
    """DAG_TARGETS through the slurm-ci profile; the output is kept as <workdir>/<label>.log."""
    cmd = snakemake_command(
        workdir,
        REPO / "Snakefile",
        DAG_TARGETS,
        "--configfile",
        str(workdir / "config.yaml"),
        *options,
    )
    result = subprocess.run(
        cmd,
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
    write_config(workdir, small_image_folder)
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
    local = {"demo_pool", "all"}  # local rules never reach SLURM
    cluster_jobs = sum(n for (rule, _), n in demo_runs.mended.jobs().items() if rule not in local)
    assert len(demo_runs.mended.submissions()) < cluster_jobs
    print(
        f"\nSLURM jobs: broken run {len(demo_runs.broken.submissions())}, mended run "
        f"{len(demo_runs.mended.submissions())}: {sorted(Counter(submitted.values()).items())}"
    )


def test_failed_shard_reruns_alone_with_what_follows(demo_runs):
    broken, mended = demo_runs.broken, demo_runs.mended
    assert "failing once on purpose" in demo_runs.failed_job_log
    assert broken.jobs()[FAILING] == 1
    assert {p for (rule, p) in broken.jobs() if rule == "embed"} == set(PARTS)

    rerun = mended.jobs()
    per_shard = {
        (rule, part) for rule, part in rerun if part is not None and rule not in AFTER_FUSE
    }
    assert per_shard == {("embed", "00001"), ("fuse", "00001")}, sorted(rerun)
    assert set(mended.rules()) - {"all"} <= AFTER_FUSE | {"embed", "fuse"}, mended.rules()
    # Everything the broken run finished was kept: same files, same modification times.
    before, after = demo_runs.after_broken, demo_runs.after_mended
    assert "shards/00001.tar" in before and "embed/00000.parquet" in before
    assert {name for name in before if after.get(name) != before[name]} == set()
    print(f"\nrerun after the failure: {sorted(mended.rules().items())}")


def test_forcerun_assign_regenerates_only_the_assignments(demo_runs):
    workdir = demo_runs.workdir
    results = workdir / "results"
    before = {part: pq.read_table(results / f"assign/{part}.parquet") for part in PARTS}
    before_mtimes = mtimes(results)

    run = snakemake_slurm(workdir, "forcerun", "--forcerun", "assign")
    assert run.returncode == 0, tail(run)
    assert run.rules() == Counter(assign=3, cluster_sizes=1, cluster_diagnostics=1), run.rules()
    assert Counter(run.submissions().values())["group_assign_assign"] == 1
    after = mtimes(results)
    changed = {name for name in after if after[name] != before_mtimes.get(name)}
    assert {f"assign/{part}.parquet" for part in PARTS} <= changed
    assert all(
        not name.startswith(("parts/", "shards/", "embed/", "fused/", "kmeans/"))
        for name in changed
    )
    for part in PARTS:  # the same labels again: assign is deterministic
        assert pq.read_table(results / f"assign/{part}.parquet").equals(before[part])
    jobs = len(run.submissions())
    print(f"\n--forcerun assign ran: {sorted(run.rules().items())}, SLURM jobs {jobs}")


# --------------------------------------------------------------------------------- training
def test_two_ranks_train_together_under_srun(slurm_cluster, tmp_path):
    """The `train` rule's launch: one SLURM job, srun starts two gloo ranks that train as one
    and both get the SIGUSR1 that SLURM sends to job steps before the time limit."""
    cmd = snakemake_command(
        tmp_path, TRAIN_SNAKEFILE, TRAIN_TARGETS, "--config", "wait_for_signal=120"
    )
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(cmd, env=snakemake_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = [tmp_path / f"ddp/ready{rank}.json" for rank in (0, 1)]
            deadline = time.monotonic() + SNAKEMAKE_TIMEOUT_S
            while not all(p.exists() for p in ready):
                assert process.poll() is None, f"ended early:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "the ranks never got ready"
                time.sleep(1)
            job_id = json.loads(ready[0].read_text())["slurm_job_id"]
            # What --signal=USR1@T (no B:) does at T s before the limit: signal the job steps.
            subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
            returncode = process.wait(timeout=SNAKEMAKE_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
    run = Run(returncode, log_path.read_text())
    assert returncode == 0, tail(run)
    assert job_id in run.submissions()

    ranks = [json.loads((tmp_path / f"ddp/rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["launcher"] == "slurm" for r in ranks)
    assert {r["slurm_job_id"] for r in ranks} == {job_id}
    assert all(r["got_sigusr1"] for r in ranks)
    # Each rank saw different data; equal weights mean the gradients were all-reduced.
    assert ranks[0]["weights_of_every_rank"] == [ranks[0]["weights"], ranks[1]["weights"]]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    torch.manual_seed(0)
    initial = torch.cat([p.flatten() for p in torch.nn.Linear(4, 1).parameters()]).tolist()
    assert ranks[0]["weights"] != pytest.approx(initial)
