"""Which torch device a job or a rank runs on, from the config's ``device`` value."""

from __future__ import annotations

import logging

import torch

from unicom.errors import UnicomError
from unicom.gpus import claim_gpu

log = logging.getLogger("unicom.devices")


def resolve_device(name: str, key: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu; anything else must be a usable torch device.
    ``key`` is the config key that named it (``embed.device``, ``evaluate.device``). A job
    that may run on a GPU first takes one of its own (:func:`claim_gpu`)."""
    if name in ("auto", "cuda"):
        claim_gpu()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UnicomError(f"config key {key}: {name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnicomError(f"config key {key}: {name!r} but no CUDA device is available")
    return device


def local_gpu_index(local_rank: int, visible_gpus: int) -> int:
    """Index of this rank's GPU among the ``visible_gpus`` GPUs its process sees.

    torchrun (and srun without GPU binding) shows every rank all of the node's GPUs: local rank
    i takes GPU i. srun with ``--ntasks-per-gpu`` or ``--gpu-bind`` sets CUDA_VISIBLE_DEVICES per
    task, so each rank sees only its own GPU, as index 0, whatever its local rank. The remainder
    gives the right GPU in both cases.
    """
    if visible_gpus < 1:
        raise UnicomError("no CUDA device is visible to this process")
    if local_rank < 0:
        raise UnicomError(f"local rank {local_rank} is negative")
    return local_rank % visible_gpus


def rank_device(name: str, local_rank: int, key: str = "train.device") -> torch.device:
    """The device of the rank with ``local_rank`` on its node. ``auto``: its GPU
    (:func:`local_gpu_index`) when CUDA is present, else the CPU; ``cuda``: its GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UnicomError(f"config key {key}: 'cuda' but no CUDA device is available")
        visible = torch.cuda.device_count()
        index = local_gpu_index(local_rank, visible)
        if index != local_rank and visible > 1:
            log.warning(
                "local rank %d sees %d GPUs: it shares cuda:%d with another rank",
                local_rank,
                visible,
                index,
            )
        name = f"cuda:{index}"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UnicomError(f"config key {key}: {name!r} is not a torch device ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UnicomError(f"config key {key}: {name!r} but no CUDA device is available")
        torch.cuda.set_device(device)
    return device
