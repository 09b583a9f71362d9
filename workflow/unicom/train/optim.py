"""Optimisation: the step count, the learning-rate schedule, parameter groups, optimisers and
the clipping of the whole (backbone + sharded head) gradient."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def total_steps(options: Mapping[str, Any], total_samples: int, world: int) -> int:
    """``steps``, or the steps that show every kept sample ``epochs`` times."""
    if options["steps"] is not None:
        return int(options["steps"])
    global_batch = options["batch_size"] * options["grad_accum_steps"] * world
    return max(1, math.ceil(options["epochs"] * total_samples / global_batch))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from 1 down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices/kernels, none on biases and norm scales (1-D tensors)."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    groups: list[dict[str, Any]], options: Mapping[str, Any], lr: float, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW or SGD; ``fused``: torch's fused step, one kernel for every parameter's update
    (the default implementation runs a dozen passes over the head's prototypes and moments)."""
    extra = {"fused": True} if fused else {}
    if options["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(options["betas"]), **extra)
    return torch.optim.SGD(groups, lr=lr, momentum=options["momentum"], **extra)


def clip_gradients(
    model_params: Sequence[nn.Parameter],
    head_params: Sequence[nn.Parameter],
    max_norm: float | None,
    distributed_head: bool,
    foreach: bool = False,
) -> torch.Tensor:
    """Clip by the norm of the whole gradient: the backbone's (the same on every rank after
    DDP) and every rank's head shard (summed over the ranks). Returns that norm.

    ``foreach``: the norms and the scaling by torch's multi-tensor kernels, a few launches
    for all the gradients and no squared copy of the head's (2 GB at 1M classes); the same
    norm up to rounding. Off, one sum of squares per gradient (the CPU default's numbers).
    """
    model_grads = [p.grad for p in model_params if p.grad is not None]
    head_grads = [p.grad for p in head_params if p.grad is not None]
    squares = torch.zeros(2, device=(model_grads or head_grads)[0].device)
    for slot, grads in ((0, model_grads), (1, head_grads)):
        if foreach and grads:
            squares[slot] = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
            continue
        for grad in grads:
            squares[slot] += grad.detach().float().pow(2).sum()
    if distributed_head:
        head_square = squares[1:].clone()
        dist.all_reduce(head_square)
        squares[1:] = head_square
    norm = squares.sum().sqrt()
    if max_norm is not None:
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        if foreach:
            torch._foreach_mul_(model_grads + head_grads, coefficient)
            return norm
        for grad in model_grads + head_grads:
            grad.mul_(coefficient.to(grad.dtype))
    return norm
