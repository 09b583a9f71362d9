"""One rank's share of training: model (DDP), head shard, two optimizers (shared backbone /
this rank's head) and their schedules, one optimizer step, and the state a checkpoint saves."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unicom import distributed
from unicom.decoding import DecodeError, PendingImages
from unicom.distributed import WorldInfo
from unicom.errors import UnicomError
from unicom.images import normalise_pixels
from unicom.models import build_model, preprocessing
from unicom.train.losses import ArcFaceLoss, MarginLoss
from unicom.train.mlcd import MLCDLoss
from unicom.train.optim import build_optimizer, clip_gradients, lr_factor, parameter_groups
from unicom.train.partial_fc import PartialFC
from unicom.train.seeds import SeedStream, derived_seed


def head_loss(options: Mapping[str, Any]) -> MarginLoss:
    """The head's loss: ArcFace on one pseudo-label a sample, MLCD's on ``train.positives`` > 1."""
    loss = MLCDLoss if options["positives"] > 1 else ArcFaceLoss
    return loss(options["margin"], options["scale"], options["margin_gradient"])


def switch(value: bool | str, device: torch.device) -> bool:
    """A speed option's setting: ``auto`` is on where it helps, on CUDA."""
    return device.type == "cuda" if value == "auto" else bool(value)


class Trainer:
    """Model (DDP), head shard, two optimizers (shared backbone / this rank's head) and their
    schedules; ``train_step`` runs one optimizer step over ``grad_accum_steps`` micro-batches.

    Speed options (train.compile, train.fused_optimizer; ``auto``: on CUDA only): the backbone
    and embedding run through ``torch.compile`` (``compile_backend``; the checkpoints and the
    export hold the plain module's names, no ``_orig_mod.``), the optimizers take their fused
    step and the clipping its multi-tensor norms. Nothing in a step waits for the GPU: the
    head's selection is computed from the labels on the host (``PartialFC.select``) and the
    pixel statistics live on the device.
    """

    def __init__(
        self,
        options: Mapping[str, Any],
        num_classes: int,
        steps: int,
        info: WorldInfo,
        device: torch.device,
        compile_backend: str = "inductor",
    ):
        self.options = options
        self.info = info
        self.device = device
        self.steps = steps
        self.compiled = switch(options["compile"], device)
        self.fused = switch(options["fused_optimizer"], device)
        self.model = build_model(options).to(device)
        self.head = PartialFC(
            head_loss(options),
            num_classes,
            options["dim"],
            sample_rate=options["sample_rate"],
            feature_rate=options["feature_rate"],
            seed=options["seed"],
        ).to(device)
        # Dropout / drop-path draw from the global generator: independent on every rank.
        torch.manual_seed(derived_seed(options["seed"], SeedStream.TORCH_GLOBAL, info.rank))
        if info.distributed:
            self.ddp: nn.Module = DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
            # DDP averages the ranks' gradients; the backbone needs their sum (see the hook).
            self.ddp.register_comm_hook(None, distributed.sum_allreduce_hook)
        else:
            self.ddp = self.model
        # What the step calls; its state stays in self.model, under the plain names.
        self.forward_model = (
            torch.compile(self.ddp, backend=compile_backend) if self.compiled else self.ddp
        )
        self.optimizer = build_optimizer(
            parameter_groups(self.model, options["weight_decay"]),
            options,
            options["lr"],
            self.fused,
        )
        self.head_optimizer = build_optimizer(
            parameter_groups(self.head, options["weight_decay"]),
            options,
            options["lr"] * options["head_lr_mult"],
            self.fused,
        )
        warmup = round(options["warmup_fraction"] * steps)
        min_ratio = options["min_lr_ratio"]

        def factor(step: int) -> float:
            return lr_factor(step, steps, warmup, min_ratio)

        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(opt, factor)
            for opt in (self.optimizer, self.head_optimizer)
        ]
        pixels = preprocessing(self.model)
        # On the device once: a tensor made from Python numbers at every step is a blocking
        # copy, which waits for the GPU's queue.
        self.mean = torch.tensor(pixels["mean"], dtype=torch.float32).to(device)
        self.std = torch.tensor(pixels["std"], dtype=torch.float32).to(device)
        precision = options["precision"]
        self.autocast = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        self.step = 0

    def device_images(self, images: torch.Tensor | PendingImages) -> torch.Tensor:
        """The loader's uint8 (B, 3, S, S) on the device, JPEGs decoded there (train.decode
        cuda) -> normalised floats."""
        if isinstance(images, PendingImages):
            try:
                pixels = images.finish(self.device)
            except DecodeError as err:
                raise UnicomError(f"cannot decode {images.names[err.row]} ({err})") from None
        else:  # a quarter of float32's bytes to move
            pixels = images.to(self.device, non_blocking=True)
        return normalise_pixels(pixels, self.mean, self.std)

    def train_step(self, micro_batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One optimizer step; returns the loss (mean over micro-batches) and gradient norm."""
        self.ddp.train()
        self.head.train()
        total_loss = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext()
            if self.info.distributed and not last:
                sync = self.ddp.no_sync()  # accumulate locally; all-reduce on the last one
            # From the labels on the host, before the backbone is queued (see PartialFC.select).
            selection = self.head.select(batch["labels"], self.device)
            images = self.device_images(batch["images"])
            with sync:
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                    embeddings = self.forward_model(images)
                    loss = self.head(embeddings, selection) / len(micro_batches)
                loss.backward()
            total_loss += loss.detach()
        grad_norm = clip_gradients(
            list(self.model.parameters()),
            list(self.head.parameters()),
            self.options["grad_clip_norm"],
            self.info.distributed,
            foreach=self.fused,
        )
        lrs = self.lrs  # the rates this step uses
        for optimizer in (self.optimizer, self.head_optimizer):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for scheduler in self.schedulers:
            scheduler.step()
        self.step += 1
        return {"loss": total_loss, "grad_norm": grad_norm, "lr": lrs[0], "head_lr": lrs[1]}

    def head_selection(self) -> tuple[int, int]:
        """(prototypes, of which positives) this rank's head used in the last micro-batch."""
        selected = self.head.last_selected_classes
        return (0 if selected is None else len(selected)), self.head.last_num_positives

    @property
    def lrs(self) -> tuple[float, float]:
        return self.optimizer.param_groups[0]["lr"], self.head_optimizer.param_groups[0]["lr"]

    def shared_state(self) -> dict[str, Any]:
        """What every rank holds alike (saved once, by rank 0)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedulers[0].state_dict(),
        }

    def rank_state(self) -> dict[str, Any]:
        """What is this rank's own: its head shard and the random generators."""
        return {
            "head": self.head.state_dict(),
            "head_optimizer": self.head_optimizer.state_dict(),
            "head_scheduler": self.schedulers[1].state_dict(),
            "rng": rng_states(self.device),
        }

    def load(self, shared: Mapping[str, Any], own: Mapping[str, Any], step: int) -> None:
        self.model.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        self.schedulers[0].load_state_dict(shared["scheduler"])
        self.head.load_state_dict(own["head"])
        self.head_optimizer.load_state_dict(own["head_optimizer"])
        self.schedulers[1].load_state_dict(own["head_scheduler"])
        set_rng_states(own["rng"], self.device)
        self.step = step


def rng_states(device: torch.device) -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
