"""Train the embedding model on the pseudo-labels (the ``train`` stage).

Model: a timm backbone (pooled features, ``num_classes=0``) -> ``Linear(features, dim, bias=False)``
-> ``BatchNorm1d(dim)``: the ArcFace/insightface embedding layer; the batch norm keeps every
embedding dimension centred and scaled alike, which suits a cosine head, and makes a bias
redundant. Backbone + embedding run under DDP; the PartialFC head (``unicom.partial_fc``) is
model-parallel (each rank owns a class range) and is not wrapped.

Launch:
    python -m unicom.train.train --shards S.tar ... --assignments S.parquet ... --num-classes K \
        --out-dir results/train --options-json '{...train section...}'
    torchrun --standalone --nproc-per-node N -m unicom.train ...      (one node)
    srun python -m unicom.train.train ...                                   (SLURM, any number of nodes)

Output folder:
    model.safetensors, model.json   the trained backbone + embedding; ``load_trained_model(dir)``
    metrics.jsonl                   one line per ``log_every`` steps (written at the end)
    metrics.partial.jsonl           the same, live
    data.json                       every input sample counted: kept / dropped and why
    checkpoints/step-NNNNNNNN/      model.pt (rank 0: model, optimizer, scheduler, step, data
                                    position) + rank-RRRRR.pt (each rank: its head shard and its
                                    optimizer/scheduler, RNG states)

A run resumes from the latest checkpoint of its folder and then reproduces the uninterrupted
run exactly (CPU): the data order is a function of the seed and the position (``train_data``),
the head's sampling generators are in its state dict, the RNG states are restored. SIGTERM or
SIGUSR1 (SLURM's warning before the time limit) -> checkpoint at the next step boundary, then
exit with 128 + the signal number, so that the job counts as failed and a rerun resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from unicom import distributed
from unicom.cli import (
    add_each_part_option,
    expand_parts,
    parse_options_json,
    run_cli,
    setup_logging,
)
from unicom.config import section_options
from unicom.devices import rank_device
from unicom.distributed import WorldInfo
from unicom.errors import UnicomError
from unicom.images import normalise_pixels
from unicom.io import atomic_path, write_json, write_text
from unicom.models import MODEL_FORMAT, build_model, export_model, preprocessing
from unicom.train.data import (
    RankData,
    TrainBatches,
    TrainTransform,
    check_centroids,
    make_loader,
    pair_inputs,
    prepare_rank_data,
)
from unicom.train.partial_fc import PartialFC, derived_seed

log = logging.getLogger("unicom.train.train")

# Keys that may change between a checkpoint and its resumption; any other change is refused,
# because the resumed run would no longer be the run that wrote the checkpoint.
RESUMABLE_KEYS = frozenset(
    {
        "num_workers",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "device",
        "nproc_per_node",
        "nodes",
    }
)
CHECKPOINT_FORMAT = 1
CHECKPOINTS = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
LIVE_METRICS = "metrics.partial.jsonl"


# ----------------------------------------------------------------------------- options


def train_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train`` section (maybe partial) with the schema's defaults, checked."""
    return section_options("train", options)


def total_steps(options: Mapping[str, Any], total_samples: int, world: int) -> int:
    """``steps``, or the steps that show every kept sample ``epochs`` times."""
    if options["steps"] is not None:
        return int(options["steps"])
    global_batch = options["batch_size"] * options["grad_accum_steps"] * world
    return max(1, math.ceil(options["epochs"] * total_samples / global_batch))


def compute_threads(
    job_threads: int, info: WorldInfo, num_workers: int, device: torch.device
) -> int:
    """Torch threads of one rank: its share of the job's cores, less its loader workers on
    CPU (more threads than cores stall every parallel op at its barrier)."""
    per_rank = job_threads // max(1, info.local_world_size)
    if device.type == "cpu":
        per_rank -= num_workers
    return max(1, per_rank)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from 1 down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- model


# ----------------------------------------------------------------------------- optimisation


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
    groups: list[dict[str, Any]], options: Mapping[str, Any], lr: float
) -> torch.optim.Optimizer:
    if options["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(options["betas"]))
    return torch.optim.SGD(groups, lr=lr, momentum=options["momentum"])


def clip_gradients(
    model_params: Sequence[nn.Parameter],
    head_params: Sequence[nn.Parameter],
    max_norm: float | None,
    distributed_head: bool,
) -> torch.Tensor:
    """Clip by the norm of the whole gradient: the backbone's (the same on every rank after
    DDP) and every rank's head shard (summed over the ranks). Returns that norm."""
    model_grads = [p.grad for p in model_params if p.grad is not None]
    head_grads = [p.grad for p in head_params if p.grad is not None]
    squares = torch.zeros(2, device=(model_grads or head_grads)[0].device)
    for slot, grads in ((0, model_grads), (1, head_grads)):
        for grad in grads:
            squares[slot] += grad.detach().float().pow(2).sum()
    if distributed_head:
        head_square = squares[1:].clone()
        dist.all_reduce(head_square)
        squares[1:] = head_square
    norm = squares.sum().sqrt()
    if max_norm is not None:
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in model_grads + head_grads:
            grad.mul_(coefficient.to(grad.dtype))
    return norm


class Trainer:
    """Model (DDP), head shard, two optimizers (shared backbone / this rank's head) and their
    schedules; ``train_step`` runs one optimizer step over ``grad_accum_steps`` micro-batches."""

    def __init__(
        self,
        options: Mapping[str, Any],
        num_classes: int,
        steps: int,
        info: WorldInfo,
        device: torch.device,
    ):
        self.options = options
        self.info = info
        self.device = device
        self.steps = steps
        self.model = build_model(options).to(device)
        self.head = PartialFC(
            num_classes,
            options["dim"],
            margin=options["margin"],
            scale=options["scale"],
            sample_rate=options["sample_rate"],
            feature_rate=options["feature_rate"],
            seed=options["seed"],
        ).to(device)
        # Dropout / drop-path draw from the global generator: independent on every rank.
        torch.manual_seed(derived_seed(options["seed"], 3, info.rank))
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
        self.optimizer = build_optimizer(
            parameter_groups(self.model, options["weight_decay"]), options, options["lr"]
        )
        self.head_optimizer = build_optimizer(
            parameter_groups(self.head, options["weight_decay"]),
            options,
            options["lr"] * options["head_lr_mult"],
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
        self.mean, self.std = tuple(pixels["mean"]), tuple(pixels["std"])
        precision = options["precision"]
        self.autocast = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        self.step = 0

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) from the loader (a quarter of float32's bytes to move) -> float."""
        return normalise_pixels(images, self.mean, self.std)

    def train_step(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer step; returns the loss (mean over micro-batches) and gradient norm."""
        self.ddp.train()
        self.head.train()
        total_loss = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext()
            if self.info.distributed and not last:
                sync = self.ddp.no_sync()  # accumulate locally; all-reduce on the last one
            images = self.normalise(batch["images"].to(self.device, non_blocking=True))
            labels = batch["labels"].to(self.device, non_blocking=True)
            with sync:
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                    loss = self.head(self.ddp(images), labels) / len(micro_batches)
                loss.backward()
            total_loss += loss.detach()
        grad_norm = clip_gradients(
            list(self.model.parameters()),
            list(self.head.parameters()),
            self.options["grad_clip_norm"],
            self.info.distributed,
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


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-NNNNNNNN``; unfinished ones are ``.step-*.tmp``), by step."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(
    root: Path,
    step: int,
    trainer: Trainer,
    header: Mapping[str, Any],
    extra_rank_state: Mapping[str, Any],
    keep: int,
) -> Path:
    """Every rank writes its file into a hidden folder; rank 0 then renames the folder into
    place (atomic), so a checkpoint folder with a visible name is always complete."""
    rank = trainer.info.rank
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    torch.save(
        {**header, "rank": rank, **trainer.rank_state(), **extra_rank_state},
        tmp / f"rank-{rank:05d}.pt",
    )
    if rank == 0:
        torch.save({**header, **trainer.shared_state()}, tmp / "model.pt")
    distributed.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in checkpoint_dirs(root)[: -keep or None] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _load_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UnicomError(f"checkpoint file {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnicomError(
            f"checkpoint {path} is corrupt ({first}); delete its folder to resume from an "
            "earlier checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UnicomError(f"checkpoint {path} is not a unicom.train checkpoint")
    return state


def check_signature(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise UnicomError(
                f"checkpoint {path} was written by a different run: {key} is "
                f"{json.dumps(saved.get(key))[:80]} there but {json.dumps(current.get(key))[:80]} "
                f"now; restore the setting or delete {path.parent} to start over"
            )


def load_checkpoint(
    path: Path, rank: int, signature: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    shared = _load_file(path / "model.pt")
    check_signature(path, shared.get("signature", {}), signature)
    own = _load_file(path / f"rank-{rank:05d}.pt")
    if own.get("step") != shared.get("step") or own.get("rank") != rank:
        raise UnicomError(f"checkpoint {path}: rank-{rank:05d}.pt does not belong with model.pt")
    return shared, own


def set_aside_other_runs(root: Path, signature: Mapping[str, Any]) -> None:
    """Move ``root`` aside when its latest checkpoint was written with another signature."""
    found = checkpoint_dirs(root)
    if not found:
        return
    latest = found[-1][1]
    try:
        check_signature(latest, _load_file(latest / "model.pt").get("signature", {}), signature)
    except UnicomError as err:
        stale = root.with_name(f"{root.name}-stale-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(root, stale)
        log.warning("%s; moved to %s, training starts over", err, stale)


# ----------------------------------------------------------------------------- signals


class StopRequest:
    """Remembers SIGTERM / SIGUSR1; the loop checks at each step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        log.warning("received %s: checkpoint at the end of this step, then exit", signum)

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainingInterrupted(Exception):
    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} after step {step}")
        self.signum = signum
        self.step = step


# ----------------------------------------------------------------------------- export


# ----------------------------------------------------------------------------- the run


def run_signature(
    options: Mapping[str, Any], num_classes: int, world: int, data: RankData
) -> dict[str, Any]:
    signature = {f"train.{k}": v for k, v in options.items() if k not in RESUMABLE_KEYS}
    signature.update(
        {"num_classes": num_classes, "world_size": world, "data_streams": data.streams}
    )
    signature["data"] = data.signature()
    return signature


def read_live_metrics(path: Path, up_to_step: int) -> list[str]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["step"] <= up_to_step:
                lines.append(line)
    return lines


def data_report(data: RankData, shard_reads: Mapping[int, Sequence[int]]) -> dict[str, Any]:
    """data.json: per shard, the labels kept / dropped and the shard samples without label."""
    shards = {}
    totals = {"assigned": 0, "ambiguous": 0, "kept": 0, "tar_samples": 0, "unlabelled": 0}
    for item in data.inputs:
        counts = dict(data.counts[item.name])
        read = shard_reads.get(item.index)
        counts["tar_samples"], counts["unlabelled"] = (read[0], read[1]) if read else (None, None)
        shards[item.name] = counts
        for key in totals:
            totals[key] += counts[key] or 0
    return {
        "shards": shards,
        "totals": totals,
        "shards_never_read": sum(1 for c in shards.values() if c["tar_samples"] is None),
        "notes": {
            "kept": "samples trained on",
            "ambiguous": "dropped: label margin sim - sim2 below train.min_label_margin",
            "unlabelled": "shard samples without a pseudo-label (embed could not decode them; "
            "see embed/{part}.skipped.csv); null for a shard the run never read",
        },
    }


def train(
    shards: Sequence[str],
    assignments: Sequence[str],
    num_classes: int,
    out_dir: str | os.PathLike,
    options: Mapping[str, Any],
    centroids: str | None = None,
    threads: int | None = None,
    show_progress: bool = True,
    info: WorldInfo | None = None,
    restart_on_mismatch: bool = False,
) -> Path:
    """The whole stage on this rank (call it on every rank). Returns the output folder.

    ``restart_on_mismatch``: checkpoints of a run with other settings or data are moved aside
    (``checkpoints-stale-<time>``) and training starts over, instead of an error. The Snakemake
    rule sets it: when the rule reruns because its inputs or params changed, old checkpoints
    belong to another run; when it reruns after a failure, they match and are resumed.
    """
    options = train_options(options)
    info = info or distributed.world_info_from_env()
    out_dir = Path(out_dir)
    device = rank_device(str(options["device"]), info.local_rank)
    if threads:
        torch.set_num_threads(compute_threads(threads, info, options["num_workers"], device))
    if num_classes < 2:
        raise UnicomError(f"--num-classes must be at least 2, got {num_classes}")
    if centroids:
        check_centroids(centroids, num_classes)
    inputs = pair_inputs(shards, assignments)
    distributed.init_distributed(info, device)
    try:
        return _train_on_rank(
            inputs, num_classes, out_dir, options, info, device, show_progress, restart_on_mismatch
        )
    finally:
        distributed.shutdown()


def _train_on_rank(
    inputs,
    num_classes,
    out_dir: Path,
    options,
    info: WorldInfo,
    device,
    show_progress,
    restart_on_mismatch: bool = False,
) -> Path:
    rank, world = info.rank, info.world_size
    data = prepare_rank_data(
        inputs, num_classes, rank, world, options["streams"], options["min_label_margin"]
    )
    steps = total_steps(options, data.total_samples, world)
    signature = run_signature(options, num_classes, world, data)
    trainer = Trainer(options, num_classes, steps, info, device)
    root = out_dir / CHECKPOINTS
    live_metrics = out_dir / LIVE_METRICS
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.tmp") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # a save that was interrupted

    if restart_on_mismatch:
        distributed.from_rank_zero(lambda: set_aside_other_runs(root, signature))
    # Resume from the latest checkpoint (rank 0 picks it so that every rank loads the same).
    latest = distributed.from_rank_zero(lambda: (checkpoint_dirs(root) or [(0, None)])[-1])
    start_step, shard_reads = 0, {}
    if latest[1] is not None:
        path = Path(latest[1])

        def resume() -> dict:
            shared, own = load_checkpoint(path, rank, signature)
            try:
                trainer.load(shared, own, int(shared["step"]))
            except (RuntimeError, KeyError, ValueError) as err:
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise UnicomError(f"checkpoint {path} does not fit this run ({first})") from None
            return dict(own.get("shard_reads", {}))

        shard_reads = distributed.on_every_rank(resume)
        start_step = trainer.step
        log.info("resuming from %s (step %d of %d)", path, start_step, steps)
    if rank == 0:
        kept = read_live_metrics(live_metrics, start_step)
        write_text(live_metrics, "".join(line + "\n" for line in kept))

    accum = options["grad_accum_steps"]
    transform = TrainTransform(
        size=options["image_size"],
        scale=tuple(options["augment"]["scale"]),
        ratio=tuple(options["augment"]["ratio"]),
        hflip=options["augment"]["hflip"],
        color_jitter=options["augment"]["color_jitter"],
    )
    dataset = TrainBatches(
        data.shards,
        transform,
        options["batch_size"],
        data.streams,
        options["seed"],
        rank,
        start_batch=start_step * accum,
        shuffle_shards=options["shuffle_shards"],
    )
    samples_per_step = options["batch_size"] * accum * world
    if rank == 0:
        log.info(
            "%d kept samples, %d steps of %d samples (%.2f epochs), %d ranks on %s, model %s",
            data.total_samples,
            steps,
            samples_per_step,
            steps * samples_per_step / data.total_samples,
            world,
            device,
            options["model"],
        )

    def header(step: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "world_size": world,
            "signature": signature,
            "data_position": {"micro_batches": step * accum, "batch_size": options["batch_size"]},
        }

    batches = make_loader(dataset, options["num_workers"], pin_memory=device.type == "cuda")
    next_batch = start_step * accum
    window_loss = torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    progress = tqdm(
        total=steps,
        initial=start_step,
        unit="step",
        desc="train",
        disable=not show_progress or rank != 0,
        mininterval=0.1 if sys.stderr.isatty() else 60,  # a log file gets a line a minute
    )
    try:
        with StopRequest() as stop:
            for step in range(start_step, steps):
                micro = []
                for _ in range(accum):
                    batch = next(batches)
                    if batch["batch_index"] != next_batch:  # the loader's order is the plan
                        raise RuntimeError(f"got batch {batch['batch_index']}, not {next_batch}")
                    next_batch += 1
                    for index, tar_samples, unlabelled in batch["shard_reads"]:
                        shard_reads[index] = (tar_samples, unlabelled)
                    micro.append(batch)
                result = trainer.train_step(micro)
                window_loss += result["loss"]
                window_steps += 1
                done = step + 1
                progress.update(1)
                if done % options["log_every"] == 0 or done == steps:
                    # Every rank's head shard of this step: r1 < 1 shows in negatives < all.
                    selection = distributed.all_gather_objects(trainer.head_selection())
                    seconds = time.perf_counter() - window_start
                    record = {
                        "step": done,
                        "loss": float(window_loss.item()) / window_steps,
                        "lr": result["lr"],
                        "head_lr": result["head_lr"],
                        "grad_norm": float(result["grad_norm"].item()),
                        "samples_per_s": window_steps * samples_per_step / seconds,
                        "epoch": done * samples_per_step / data.total_samples,
                        "head_prototypes": sum(n for n, _ in selection),
                        "head_negatives": sum(n - p for n, p in selection),
                    }
                    if rank == 0:
                        with open(live_metrics, "a") as handle:
                            handle.write(json.dumps(record) + "\n")
                    progress.set_postfix(loss=f"{record['loss']:.3f}")
                    window_loss.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                signum = int(distributed.all_reduce_max(stop.signum, device))
                if signum or done % options["checkpoint_every"] == 0 or done == steps:
                    save_checkpoint(
                        root,
                        done,
                        trainer,
                        header(done),
                        {"shard_reads": dict(shard_reads)},
                        options["keep_checkpoints"],
                    )
                if signum and done < steps:
                    raise TrainingInterrupted(signum, done)
    finally:
        progress.close()
        batches.close()

    all_reads: dict[int, Sequence[int]] = {}
    for reads in distributed.all_gather_objects(shard_reads):
        all_reads.update(reads)
    if rank == 0:
        info_json = {
            "format": MODEL_FORMAT,
            "model": options["model"],
            "model_kwargs": options["model_kwargs"],
            "pretrained": options["pretrained"],
            "dim": options["dim"],
            "num_features": int(trainer.model.backbone.num_features),
            "embedding": "backbone pooled features -> Linear(bias=False) -> BatchNorm1d; "
            "L2-normalise for retrieval",
            "image_size": options["image_size"],
            "interpolation": "bicubic",
            **preprocessing(trainer.model),
            "weights": "model.safetensors",
            "rebuild": "from unicom.models import load_trained_model; load_trained_model(dir)",
            "training": {
                "steps": steps,
                "num_classes": num_classes,
                "world_size": world,
                "samples_seen": steps * samples_per_step,
                "epochs": steps * samples_per_step / data.total_samples,
            },
        }
        export_model(out_dir, trainer.model, info_json)
        write_json(out_dir / "data.json", data_report(data, all_reads))
        with atomic_path(out_dir / "metrics.jsonl") as tmp:
            shutil.copyfile(live_metrics, tmp)
        log.info("trained %d steps -> %s", steps, out_dir)
    distributed.barrier()
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unicom.train.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shards", nargs="+", required=True, help="webdataset shards (.tar)")
    parser.add_argument(
        "--assignments", nargs="+", required=True, help="assign/{part}.parquet, one per shard"
    )
    parser.add_argument("--num-classes", type=int, required=True, help="k of the k-means")
    parser.add_argument("--out-dir", required=True, help="output and checkpoint folder")
    parser.add_argument("--options-json", default="{}", help="the config's train section")
    parser.add_argument("--centroids", help="kmeans/centroids.npy: checks --num-classes")
    parser.add_argument("--threads", type=int, help="CPU threads of the job (split over ranks)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--restart-on-mismatch",
        action="store_true",
        help="set aside checkpoints of a run with other settings instead of failing",
    )
    add_each_part_option(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        train(
            expand_parts(args.shards, args.each_part),
            expand_parts(args.assignments, args.each_part),
            args.num_classes,
            args.out_dir,
            parse_options_json(args.options_json),
            centroids=args.centroids,
            threads=args.threads,
            show_progress=not args.no_progress,
            restart_on_mismatch=args.restart_on_mismatch,
        )
    except TrainingInterrupted as stop:
        log.warning("%s; checkpoint saved, rerun to resume", stop)
        raise SystemExit(128 + stop.signum) from None


if __name__ == "__main__":
    run_cli(main)
