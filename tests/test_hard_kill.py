"""A real run on a shared filesystem (umask 002) whose Snakemake is SIGKILLed while training
runs under torchrun: the jobs end with it, the same command then asks for --unlock, and after
``snakemake --unlock`` it finishes, training resumed from the checkpoint the kill left. Every
folder and file the run wrote is then shared with the group."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from helpers.workflow import (
    DEMO_CONFIG,
    job_counts,
    snakemake_command,
    snakemake_with,
    write_config,
)

pytestmark = pytest.mark.slow

# Two ranks under torchrun, a loader worker each, and enough steps that the kill lands during
# training even where a step is fast (the watchdog looks once a second). All shards in one job
# per stage: fewer model loads, a shorter test.
TRAIN = {"steps": 12, "checkpoint_every": 2, "nproc_per_node": 2, "num_workers": 1}
DOWNLOAD = {"shards_per_job": 10}
# As profiles/local: a job that finished its outputs after the kill is redone, not refused.
RERUN_INCOMPLETE = "--rerun-incomplete"
UPSTREAM = {"demo_pool", "split_urls", "download", "embed", "fuse", "kmeans", "assign"}


@pytest.fixture
def umask_002():
    previous = os.umask(0o002)
    yield
    os.umask(previous)


def gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def jobs_once_training(run: subprocess.Popen, results: Path, output: Path) -> dict:
    """The run's job processes and their command lines, once training saved a checkpoint."""
    deadline = time.monotonic() + 600
    while not (results / "train/checkpoints/step-00000002").is_dir():
        assert run.poll() is None, f"the run ended early:\n{output.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "training did not start in 10 minutes"
        time.sleep(0.2)
    jobs = {}
    for process in psutil.Process(run.pid).children(recursive=True):
        try:
            jobs[process] = " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            pass  # a job that just ended
    return jobs


def not_shared(root: Path) -> list[str]:
    """Paths under ``root`` that umask 002 should have made group-writable but did not."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        wanted = 0o775 if stat.S_ISDIR(mode) else 0o664
        if not stat.S_ISLNK(mode) and mode & wanted != wanted:
            wrong.append(f"{stat.filemode(mode)} {path.relative_to(root)}")
    return wrong


def test_a_killed_run_ends_its_jobs_and_finishes_after_unlock(
    tmp_path, small_image_folder, umask_002
):
    write_config(tmp_path, small_image_folder, train=TRAIN, download=DOWNLOAD)
    configs = [DEMO_CONFIG, tmp_path / "config.yaml"]
    results = tmp_path / "results"
    output = tmp_path / "killed-run.txt"
    with output.open("w") as sink:
        run = subprocess.Popen(
            snakemake_command(tmp_path, configs, RERUN_INCOMPLETE),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    started = time.monotonic()
    try:
        jobs = jobs_once_training(run, results, output)
        print(f"training checkpointed step 2 {time.monotonic() - started:.0f} s into the run")
    finally:
        run.kill()  # SIGKILL: no cleanup, the lock stays
        run.wait()
    killed = time.monotonic()
    ranks = [command for command in jobs.values() if "unicom.train.train" in command]
    assert len(ranks) >= 3, jobs  # torchrun, its two ranks (and their loader workers)

    while not all(gone(p) for p in jobs) and time.monotonic() < killed + 60:
        time.sleep(0.1)
    seconds = time.monotonic() - killed
    survivors = [command for p, command in jobs.items() if not gone(p)]
    for process in jobs:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()  # psutil checks it is still the same process
    assert survivors == []
    print(f"the killed run's {len(jobs)} job processes ended {seconds:.1f} s after the kill")
    assert seconds < 30
    # Training stopped as on SIGTERM: it saved a checkpoint at the step it was in.
    train_log = (results / "logs/train.log").read_text()
    assert "is gone: stopping as on SIGTERM" in train_log
    assert "checkpoint saved, rerun to resume" in train_log
    checkpoints = sorted(p.name for p in (results / "train/checkpoints").glob("step-*"))
    stopped_at = int(checkpoints[-1].removeprefix("step-"))
    assert 2 <= stopped_at < TRAIN["steps"]

    locked = snakemake_with(tmp_path, configs, RERUN_INCOMPLETE, check=False)
    assert locked.returncode != 0
    assert "Directory cannot be locked" in locked.stderr and "--unlock" in locked.stderr
    snakemake_with(tmp_path, configs, "--unlock")
    started = time.monotonic()
    rerun = job_counts(snakemake_with(tmp_path, configs, RERUN_INCOMPLETE))
    print(f"the rerun after --unlock ran {rerun} in {time.monotonic() - started:.0f} s")
    assert rerun["train"] == 1 and not UPSTREAM & set(rerun), rerun
    train_log = (results / "logs/train.log").read_text()
    assert f"(step {stopped_at} of {TRAIN['steps']})" in train_log  # resumed, not restarted
    metrics = [json.loads(line) for line in (results / "train/metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == list(range(1, TRAIN["steps"] + 1))
    assert job_counts(snakemake_with(tmp_path, configs, "-n")) == {}

    assert not_shared(results) == []
