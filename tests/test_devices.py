"""unicom.devices: the GPU a rank uses, whether it sees every GPU of its node or only its own."""

from __future__ import annotations

import pytest
import torch

from unicom.devices import local_gpu_index, rank_device
from unicom.distributed import WorldInfo
from unicom.errors import UnicomError


@pytest.mark.parametrize(
    "local_rank, visible, index",
    [
        (0, 4, 0),
        (3, 4, 3),  # torchrun, or srun without GPU binding: every rank sees the node's GPUs
        (0, 1, 0),
        (3, 1, 0),  # srun --ntasks-per-gpu / --gpu-bind: each rank sees only its own GPU
        (5, 4, 1),
    ],
)
def test_local_gpu_index(local_rank, visible, index):
    assert local_gpu_index(local_rank, visible) == index


def test_local_gpu_index_needs_a_gpu():
    with pytest.raises(UnicomError, match="no CUDA device is visible"):
        local_gpu_index(0, 0)


def test_auto_device_of_a_rank_bound_to_one_gpu(monkeypatch):
    """Local rank 3 of a SLURM job whose task sees one GPU (CUDA_VISIBLE_DEVICES=<its GPU>)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    info = WorldInfo(7, 8, 3, 4, "gpu007", 24242, "slurm")
    assert rank_device("auto", info.local_rank) == torch.device("cuda:0")
    assert rank_device("cuda", info.local_rank) == torch.device("cuda:0")
    assert chosen == [torch.device("cuda:0")] * 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto", info.local_rank) == torch.device("cpu")
    with pytest.raises(UnicomError, match="no CUDA device is available"):
        rank_device("cuda", info.local_rank)
