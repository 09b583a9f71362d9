"""A few DistributedDataParallel steps on the CPU (gloo), one process per SLURM task.

Launched by tests/test_slurm.py through `srun` inside a SLURM job: each rank finds its rank,
the world size and the rendezvous address with the project's own ``unicom.distributed``, trains a
tiny linear model on data that differs per rank, and writes ``rank<r>.json`` with what it saw.
Identical weights on every rank after the steps prove that the gradients were all-reduced.

With ``--wait-for-signal S`` each rank then writes ``ready<r>.json`` and waits up to S seconds
for SIGUSR1 -- what SLURM sends before the time limit (``--signal=USR1@T``) and what the trainer
answers by saving a checkpoint and exiting -- and records whether it came.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unicom import distributed
from unicom.io import run_cli, setup_logging, write_json


def train_steps(model: nn.Module, rank: int, steps: int) -> None:
    """SGD on inputs filled with ``rank + 1``: each rank alone would drift elsewhere."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs = torch.full((8, 4), float(rank + 1))
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(inputs).pow(2).mean()
        loss.backward()
        optimizer.step()


def wait_for(received: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not received and time.monotonic() < deadline:
        time.sleep(0.2)
    return bool(received)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--wait-for-signal", type=float, default=0, metavar="SECONDS")
    args = parser.parse_args(argv)
    setup_logging()
    # First thing: SIGUSR1's default action would kill the rank.
    received: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, _frame: received.append(signum))
    torch.set_num_threads(1)

    info = distributed.world_info_from_env()
    device = torch.device("cpu")
    distributed.init_distributed(info, device, timeout_s=120)
    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Linear(4, 1)
    ddp_model = DistributedDataParallel(model) if info.distributed else model
    train_steps(ddp_model, info.rank, args.steps)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    every_rank = distributed.all_gather_objects(weights)
    got_signal = None
    if args.wait_for_signal:
        ready = {"slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        write_json(Path(args.out_dir) / f"ready{info.rank}.json", ready)
        got_signal = wait_for(received, args.wait_for_signal)
    write_json(
        Path(args.out_dir) / f"rank{info.rank}.json",
        {
            "rank": info.rank,
            "world_size": info.world_size,
            "launcher": info.launcher,
            "master": f"{info.master_addr}:{info.master_port}",
            "host": socket.gethostname(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_step_id": os.environ.get("SLURM_STEP_ID"),
            "weights": weights,
            "weights_of_every_rank": every_rank,
            "got_sigusr1": got_signal,
        },
    )
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    run_cli(main)
