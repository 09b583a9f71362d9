"""torch.distributed ranks of a test: spawned processes on loopback gloo, or under torchrun."""

from __future__ import annotations

import datetime
import socket
import sys
import time

import pytest

# Two ranks of one node under real torchrun (append `-m <module> ...`).
TORCHRUN_TWO_RANKS = [
    sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_gloo(rank: int, world: int, port: int) -> None:
    """One thread, and a gloo process group on loopback: a rank spawned by a test."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def spawn_ranks(worker, world: int, out_dir: str, what: str, timeout: float = 120) -> None:
    """``worker(rank, world, port, out_dir)`` on ``world`` spawned processes (each joins gloo
    with ``join_gloo``); kills them and fails the test after ``timeout`` seconds."""
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} did not finish in {timeout:g} s")


def head_steps(head, batch, labels, steps: int) -> list[dict]:
    """``steps`` forward/backward passes of a PartialFC ``head`` on ``batch()`` (a fresh leaf
    each step) and ``labels``; what each step computed and selected."""
    recorded = []
    for _ in range(steps):
        head.zero_grad()
        embeddings = batch().requires_grad_(True)
        loss = head(embeddings, labels)
        loss.backward()
        grad = head.weight.grad
        recorded.append(
            {
                "loss": loss.detach(),
                "embedding_grad": embeddings.grad,
                "weight_grad": grad.to_dense() if grad.is_sparse else grad,
                "classes": head.last_selected_classes,
                "dims": head.last_selected_dims,
            }
        )
    return recorded
