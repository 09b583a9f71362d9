"""Who am I in the job: rank and world from torchrun's or SLURM's environment, and set-up.

One entry point for both launchers:

- ``torchrun --nproc-per-node N -m unicom.train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT;
- ``srun python -m unicom.train.train ...`` sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; the
  master is the first host of SLURM_JOB_NODELIST and the port is derived from SLURM_JOB_ID,
  unless MASTER_ADDR / MASTER_PORT are set already.

torchrun's variables win when both are present (torchrun inside a SLURM allocation). World size 1
initialises nothing: single-process code paths never touch torch.distributed.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from unicom.errors import UnicomError

log = logging.getLogger("unicom.distributed")

# MASTER_PORT derived from SLURM_JOB_ID: a port in [BASE, BASE + SPAN) that two jobs sharing a
# node are unlikely to collide on (consecutive job ids get different ports).
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000
DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
T = TypeVar("T")


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise UnicomError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise UnicomError(f"environment variable {name}={value!r} is not an integer") from None


def split_nodelist(nodelist: str) -> list[str]:
    """Top-level comma-separated items of a SLURM node list (commas in brackets stay)."""
    items, depth, current = [], 0, ""
    for char in nodelist:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item for item in items if item]


def first_hostname(nodelist: str) -> str:
    """First host of a SLURM node list, e.g. ``gpu[003-005,9],cpu1`` -> ``gpu003``.

    Each bracket group contributes the first value of its first range, zero padding kept.
    """
    items = split_nodelist(nodelist.strip())
    if not items:
        raise UnicomError(f"SLURM node list {nodelist!r} is empty")

    def first_of_group(match: re.Match) -> str:
        first_range = match.group(1).split(",")[0]
        return first_range.split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", first_of_group, items[0])
    if not host or "[" in host or "]" in host:
        raise UnicomError(f"cannot parse the SLURM node list {nodelist!r}")
    return host


def slurm_first_host(nodelist: str) -> str:
    """``scontrol show hostnames`` when installed (it knows every syntax), else our parser."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            result = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            hosts = result.stdout.split()
            if hosts:
                return hosts[0]
        except (subprocess.SubprocessError, OSError) as err:
            log.warning("scontrol show hostnames failed (%s); parsing the node list", err)
    return first_hostname(nodelist)


def port_from_job_id(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id)  # array jobs: "1234_5"
    if not digits:
        raise UnicomError(f"SLURM_JOB_ID={job_id!r} holds no digits to derive MASTER_PORT from")
    return SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN


def world_info_from_env(
    env: Mapping[str, str] | None = None,
    first_host: Callable[[str], str] = slurm_first_host,
) -> WorldInfo:
    """Rank, world size and rendezvous address of this process (pure given ``env``)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int_env(env, "WORLD_SIZE")
        info = WorldInfo(
            rank=_int_env(env, "RANK"),
            world_size=world,
            local_rank=_int_env(env, "LOCAL_RANK", 0),
            local_world_size=_int_env(env, "LOCAL_WORLD_SIZE", world),
            master_addr=env.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
            master_port=_int_env(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
            launcher="torchrun",
        )
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int_env(env, "SLURM_NTASKS")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        if env.get("MASTER_ADDR"):
            addr = env["MASTER_ADDR"]
        elif world > 1:
            if not nodelist:
                raise UnicomError("SLURM_JOB_NODELIST is not set: cannot find the master host")
            addr = first_host(nodelist)
        else:
            addr = DEFAULT_MASTER_ADDR
        if env.get("MASTER_PORT"):
            port = _int_env(env, "MASTER_PORT")
        elif world > 1:
            port = port_from_job_id(env.get("SLURM_JOB_ID", ""))
        else:
            port = DEFAULT_MASTER_PORT
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        info = WorldInfo(
            rank=_int_env(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int_env(env, "SLURM_LOCALID", 0),
            local_world_size=int(tasks_per_node) if tasks_per_node.isdigit() else 1,
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    else:
        info = WorldInfo(0, 1, 0, 1, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, "single")
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise UnicomError(
            f"{info.launcher}: rank {info.rank} is not in [0, world size {info.world_size})"
        )
    return info


def init_distributed(info: WorldInfo, device: torch.device, timeout_s: float = 600) -> None:
    """Join the process group (nccl on GPU, gloo on CPU); nothing for world size 1.

    On GPUs the group also has gloo for tensors on the host: the trainer's per-step exchanges
    of labels and stop signals go through it, so that they never wait for the GPU's queue.
    """
    if not info.distributed:
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    host = f"[{info.master_addr}]" if ":" in info.master_addr else info.master_addr  # IPv6
    log.info(
        "rank %d/%d (%s): %s rendezvous at %s:%d",
        info.rank,
        info.world_size,
        info.launcher,
        backend,
        info.master_addr,
        info.master_port,
    )
    dist.init_process_group(
        backend,
        init_method=f"tcp://{host}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_max(value: float) -> float:
    """The largest ``value`` of all ranks (every rank gets it), exchanged on the host."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def all_gather_objects(value: Any) -> list[Any]:
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def on_every_rank(fn: Callable[[], T]) -> T:
    """Run ``fn`` on each rank; if it raised UnicomError on any rank, raise it on every rank.

    Without this, one rank with bad input would exit while the others wait forever in the
    next collective.
    """
    error: str | None = None
    result = None
    try:
        result = fn()
    except UnicomError as err:
        error = str(err)
    errors = [e for e in all_gather_objects(error) if e is not None]
    if errors:
        raise UnicomError(errors[0])
    return result  # type: ignore[return-value]


def from_rank_zero(fn: Callable[[], T]) -> T:
    """``fn()`` computed on rank 0 and sent to every rank (an error on rank 0 is raised on all)."""
    if not is_distributed():
        return fn()
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = ("ok", fn())
        except UnicomError as err:
            payload[0] = ("error", str(err))
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise UnicomError(value)
    return value


def sum_allreduce_hook(_state, bucket):  # no annotations: DDP rejects string annotations
    """DDP comm hook that SUMS the ranks' gradients, where DDP's default averages them.

    For a loss that is the same global mean on every rank while each rank's inputs get their
    exact gradient (PartialFC), the full gradient is the sum of the ranks' contributions.
    """
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
