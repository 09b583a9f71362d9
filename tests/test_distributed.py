"""unicom.distributed: the world a rank is in (torchrun's or SLURM's variables, a SLURM node
list's first host) and DDP's gradient hook (summed over ranks, as PartialFC needs), on two real
gloo ranks."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from unicom.distributed import first_hostname, port_from_job_id, world_info_from_env
from unicom.errors import UnicomError
from unicom.train.losses import ArcFaceLoss
from unicom.train.partial_fc import PartialFC

RUN_TIMEOUT = 120


def test_world_info_from_torchrun_env():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "29411",
        "SLURM_PROCID": "0",  # torchrun inside a SLURM job: torchrun's variables win
        "SLURM_NTASKS": "1",
    }
    info = world_info_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 8, 1, 2)
    assert (info.master_addr, info.master_port, info.launcher) == ("node7", 29411, "torchrun")


def test_world_info_from_slurm_env():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "4242",
    }
    info = world_info_from_env(env, first_host=first_hostname)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert info.master_addr == "gpu007" and info.launcher == "slurm"
    assert info.master_port == port_from_job_id("4242") == 20000 + 4242
    # Every rank of the job derives the same port; MASTER_ADDR/PORT set by hand win.
    assert world_info_from_env({**env, "SLURM_PROCID": "0"}, first_hostname).master_port == (
        info.master_port
    )
    manual = world_info_from_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (manual.master_addr, manual.master_port) == ("10.0.0.1", 1234)


def test_world_info_single_process_and_bad_rank():
    info = world_info_from_env({})
    assert (info.rank, info.world_size, info.distributed) == (0, 1, False)
    with pytest.raises(UnicomError, match="rank 4 is not in"):
        world_info_from_env({"RANK": "4", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node1", "node1"),
        ("node[01-04,07]", "node01"),
        ("gpu[003-005,9],cpu1", "gpu003"),
        ("a1,b[2-3]", "a1"),
        ("rack[2-3]-n[10-11]", "rack2-n10"),
        ("host[5]", "host5"),
    ],
)
def test_first_hostname_of_slurm_node_lists(nodelist, first):
    assert first_hostname(nodelist) == first


# --- DDP gradient: summed, not averaged ---------------------------------------------------------


# Each rank: a Linear "backbone" under DDP with the summing hook, then PartialFC; unequal local
# batches. Run as a plain script so that the ranks import torch only.
DDP_RANK_SCRIPT = """
import datetime, sys, torch, torch.distributed as dist
from unicom.distributed import sum_allreduce_hook
from unicom.train.losses import ArcFaceLoss
from unicom.train.partial_fc import PartialFC
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
torch.manual_seed(0)
model = torch.nn.Linear(6, 4)
ddp = torch.nn.parallel.DistributedDataParallel(model)
ddp.register_comm_hook(None, sum_allreduce_hook)
head = PartialFC(ArcFaceLoss(), 5, 4, sample_rate=1.0, feature_rate=1.0, seed=1)
inputs = torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
labels = torch.tensor([0, 1, 2, 3, 4, 0])
rows = slice(0, 4) if rank == 0 else slice(4, 6)
head(ddp(inputs[rows]), labels[rows]).backward()
torch.save(model.weight.grad, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_ddp_hook_gives_the_full_batch_gradient(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    ranks = [
        subprocess.Popen([sys.executable, "-c", DDP_RANK_SCRIPT, str(rank), port, str(tmp_path)])
        for rank in range(2)
    ]
    assert [rank.wait(timeout=RUN_TIMEOUT) for rank in ranks] == [0, 0]
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    head = PartialFC(ArcFaceLoss(), 5, 4, sample_rate=1.0, feature_rate=1.0, seed=1)
    inputs = torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
    head(model(inputs), torch.tensor([0, 1, 2, 3, 4, 0])).backward()
    for rank in range(2):
        grad = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # DDP's own averaging would give half of it.
        torch.testing.assert_close(grad, model.weight.grad, rtol=1e-5, atol=1e-6)
