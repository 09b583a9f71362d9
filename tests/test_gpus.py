"""unicom.gpus: one-GPU jobs on a shared machine each take a GPU of their own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from unicom.gpus import visible_gpus

from helpers import REPO

# A job: take a GPU, say which, then hold it until told to stop (stdin closes).
CLAIM = textwrap.dedent(
    """
    import logging, os, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from unicom.gpus import claim_gpu
    claim_gpu(lock_dir=Path(sys.argv[1]))
    print(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), flush=True)
    sys.stdin.read()
    """
)


def start_job(lock_dir, visible: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return subprocess.Popen(
        [sys.executable, "-c", CLAIM, str(lock_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_visible_gpus_come_from_the_scheduler_first():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []  # hidden on purpose


def test_concurrent_jobs_take_different_gpus_and_a_freed_one_is_taken_again(tmp_path):
    first = start_job(tmp_path, "0,1")
    assert first.stdout.readline().strip() == "0"
    second = start_job(tmp_path, "0,1")
    assert second.stdout.readline().strip() == "1"
    # More jobs than GPUs (no --resources gpu=N): the third shares one, and says so.
    third = start_job(tmp_path, "0,1")
    assert third.stdout.readline().strip() in {"0", "1"}
    third.stdin.close()
    assert "every GPU (0,1) is held by another unicom job" in third.stderr.read()
    # A job that ends (however: the lock dies with the process) frees its GPU.
    first.kill()
    first.wait()
    fourth = start_job(tmp_path, "0,1")
    assert fourth.stdout.readline().strip() == "0"
    for job in (second, fourth):
        job.stdin.close()
        job.wait(timeout=30)


def test_one_visible_gpu_or_none_is_left_alone(tmp_path):
    for visible in ("7", ""):
        job = start_job(tmp_path, visible)
        assert job.stdout.readline().strip() == visible
        job.stdin.close()
        job.wait(timeout=30)
    assert not any(tmp_path.iterdir())  # nothing to choose from: no lock taken
