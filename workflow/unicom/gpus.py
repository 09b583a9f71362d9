"""Which GPU a one-GPU job takes on a machine it shares with other jobs (no torch import:
the CPU-only stages call it too)."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("unicom.gpus")

# Where a one-GPU job records the GPU it took (one lock file per GPU, held until it exits).
GPU_LOCK_DIR = Path(tempfile.gettempdir()) / f"unicom-gpus-{os.getuid()}"
# The lock of this process's GPU: open for the process's lifetime (the OS drops it at exit,
# a SIGKILL included).
_held_gpu_lock: int | None = None


def visible_gpus(env: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs this process may use, without initialising CUDA: CUDA_VISIBLE_DEVICES when set
    (SLURM sets it to the job's GPUs), else the driver's list of GPUs."""
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in listed.split(",") if gpu.strip()]
    driver = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []


def claim_gpu(env: Mapping[str, str] = os.environ, lock_dir: Path = GPU_LOCK_DIR) -> str | None:
    """On a machine whose GPUs this job shares with other one-GPU jobs (one node, no scheduler
    binding GPUs to jobs), take a GPU no other unicom job holds and make it the only one this
    process sees (sets CUDA_VISIBLE_DEVICES; call it before anything initialises CUDA).

    Snakemake's ``--resources gpu=N`` keeps at most N such jobs running, so a free GPU is
    there; without it, jobs beyond the GPU count share one, with a warning. Returns the GPU
    taken, None where there is at most one to choose from (SLURM's one-GPU jobs, a CPU box)."""
    global _held_gpu_lock
    gpus = visible_gpus(env)
    if len(gpus) < 2 or _held_gpu_lock is not None:
        return None
    lock_dir.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        fd = os.open(lock_dir / f"gpu-{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held_gpu_lock = fd
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        log.info("took GPU %s of %s (no other unicom job holds it)", gpu, ",".join(gpus))
        return gpu
    gpu = gpus[os.getpid() % len(gpus)]
    log.warning(
        "every GPU (%s) is held by another unicom job: sharing GPU %s; run snakemake with "
        "--resources gpu=%d so that it starts no more one-GPU jobs than there are GPUs",
        ",".join(gpus),
        gpu,
        len(gpus),
    )
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu
