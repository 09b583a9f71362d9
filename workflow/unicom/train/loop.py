"""One rank's run from start to export: resume from the latest checkpoint, then steps of
micro-batches from the loader, metrics every ``log_every`` steps, checkpoints every
``checkpoint_every`` steps (and on SIGTERM/SIGUSR1), and at the end the exported model and the
accounting of every input sample. Collective calls are made on every rank in the same order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from unicom import distributed, drops
from unicom.distributed import WorldInfo
from unicom.errors import UnicomError
from unicom.io import atomic_path, write_json, write_text
from unicom.models import MODEL_FORMAT, export_model, preprocessing
from unicom.train.augment import TrainTransform
from unicom.train.batches import TrainBatches, make_loader
from unicom.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINTS,
    checkpoint_dirs,
    load_checkpoint,
    run_signature,
    save_checkpoint,
    set_aside_other_runs,
)
from unicom.train.inputs import RankData, ShardInput, prepare_rank_data
from unicom.train.metrics import MetricsWindow
from unicom.train.optim import total_steps
from unicom.train.signals import StopRequest, TrainingInterrupted
from unicom.train.trainer import Trainer

log = logging.getLogger("unicom.train.loop")

LIVE_METRICS = "metrics.partial.jsonl"
ShardReads = dict[int, Sequence[int]]  # shard index -> (tar samples, unlabelled)


@dataclass
class Run:
    """What every part of one rank's run needs to know."""

    options: Mapping[str, Any]
    info: WorldInfo
    device: torch.device
    out_dir: Path
    data: RankData
    num_classes: int
    steps: int

    @property
    def root(self) -> Path:
        return self.out_dir / CHECKPOINTS

    @property
    def live_metrics(self) -> Path:
        return self.out_dir / LIVE_METRICS

    @property
    def accum(self) -> int:
        return int(self.options["grad_accum_steps"])

    @property
    def samples_per_step(self) -> int:
        return self.options["batch_size"] * self.accum * self.info.world_size

    def header(self, step: int, signature: Mapping[str, Any]) -> dict[str, Any]:
        """What every checkpoint file of ``step`` starts with."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "world_size": self.info.world_size,
            "signature": signature,
            "data_position": {
                "micro_batches": step * self.accum,
                "batch_size": self.options["batch_size"],
            },
        }


def train_on_rank(
    inputs: Sequence[ShardInput],
    num_classes: int,
    out_dir: Path,
    options: Mapping[str, Any],
    info: WorldInfo,
    device: torch.device,
    show_progress: bool,
    restart_on_mismatch: bool = False,
    skip_files: Sequence[str] = (),
) -> Path:
    """The run on this rank (every rank calls it); returns the output folder."""
    data = prepare_rank_data(
        inputs,
        num_classes,
        info.rank,
        info.world_size,
        options["streams"],
        options["min_label_margin"],
        options["positives"],
        skip_files,
    )
    steps = total_steps(options, data.total_samples, info.world_size)
    run = Run(options, info, device, out_dir, data, num_classes, steps)
    signature = run_signature(options, num_classes, info.world_size, data)
    trainer = Trainer(options, num_classes, steps, info, device)
    prepare_output(run, signature, restart_on_mismatch)
    start_step, shard_reads = resume(run, trainer, signature)
    if info.rank == 0:
        kept = read_live_metrics(run.live_metrics, start_step)
        write_text(run.live_metrics, "".join(line + "\n" for line in kept))
        log_plan(run)
    run_steps(run, trainer, signature, start_step, shard_reads, show_progress)
    finish(run, trainer, shard_reads)
    return out_dir


def prepare_output(run: Run, signature: Mapping[str, Any], restart_on_mismatch: bool) -> None:
    if run.info.rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in run.root.glob(".step-*.tmp") if run.root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # a save that was interrupted
    if restart_on_mismatch:
        distributed.from_rank_zero(lambda: set_aside_other_runs(run.root, signature))


def resume(run: Run, trainer: Trainer, signature: Mapping[str, Any]) -> tuple[int, ShardReads]:
    """Load the latest checkpoint, if any (rank 0 picks it so that every rank loads the same);
    returns the step to start from and the shard reads counted so far."""
    latest = distributed.from_rank_zero(lambda: (checkpoint_dirs(run.root) or [(0, None)])[-1])
    if latest[1] is None:
        return 0, {}
    path = Path(latest[1])

    def load() -> ShardReads:
        shared, own = load_checkpoint(path, run.info.rank, signature)
        try:
            trainer.load(shared, own, int(shared["step"]))
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UnicomError(f"checkpoint {path} does not fit this run ({first})") from None
        return dict(own.get("shard_reads", {}))

    shard_reads = distributed.on_every_rank(load)
    log.info("resuming from %s (step %d of %d)", path, trainer.step, run.steps)
    return trainer.step, shard_reads


def read_live_metrics(path: Path, up_to_step: int) -> list[str]:
    """The live metrics lines of the steps up to a resumed checkpoint (later ones are redone)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["step"] <= up_to_step:
                lines.append(line)
    return lines


def log_plan(run: Run) -> None:
    log.info(
        "%d kept samples, %d steps of %d samples (%.2f epochs), %d ranks on %s, model %s",
        run.data.total_samples,
        run.steps,
        run.samples_per_step,
        run.steps * run.samples_per_step / run.data.total_samples,
        run.info.world_size,
        run.device,
        run.options["model"],
    )


def training_batches(run: Run, start_step: int) -> TrainBatches:
    """This rank's micro-batches from the one after ``start_step``'s last on."""
    augment = run.options["augment"]
    transform = TrainTransform(
        size=run.options["image_size"],
        scale=tuple(augment["scale"]),
        ratio=tuple(augment["ratio"]),
        hflip=augment["hflip"],
        color_jitter=augment["color_jitter"],
        rand_augment_ops=augment["rand_augment_ops"],
        rand_augment_magnitude=augment["rand_augment_magnitude"],
        rand_augment_std=augment["rand_augment_std"],
        random_erasing=augment["random_erasing"],
    )
    return TrainBatches(
        run.data.shards,
        transform,
        run.options["batch_size"],
        run.data.streams,
        run.options["seed"],
        run.info.rank,
        start_batch=start_step * run.accum,
        shuffle_shards=run.options["shuffle_shards"],
        decode=run.options["decode"],
    )


def next_micro_batches(
    batches: Iterator[dict[str, Any]], count: int, first: int, shard_reads: ShardReads
) -> list[dict[str, Any]]:
    """The ``count`` micro-batches ``first, first + 1, ...`` of one step; records shard reads."""
    micro = []
    for expected in range(first, first + count):
        batch = next(batches)
        if batch["batch_index"] != expected:  # the loader's order is the plan
            raise RuntimeError(f"got batch {batch['batch_index']}, not {expected}")
        for index, tar_samples, unlabelled in batch["shard_reads"]:
            shard_reads[index] = (tar_samples, unlabelled)
        micro.append(batch)
    return micro


def run_steps(
    run: Run,
    trainer: Trainer,
    signature: Mapping[str, Any],
    start_step: int,
    shard_reads: ShardReads,
    show_progress: bool,
) -> None:
    """Steps ``start_step + 1 .. run.steps``; checkpoint and raise TrainingInterrupted when a
    stop signal arrives before the last."""
    options = run.options
    batches = make_loader(
        training_batches(run, start_step),
        options["num_workers"],
        pin_memory=run.device.type == "cuda",
    )
    window = MetricsWindow(run)
    progress = tqdm(
        total=run.steps,
        initial=start_step,
        unit="step",
        desc="train",
        disable=not show_progress or run.info.rank != 0,
        mininterval=0.1 if sys.stderr.isatty() else 60,  # a log file gets a line a minute
    )
    try:
        with StopRequest() as stop:
            for step in range(start_step, run.steps):
                asked = time.perf_counter()
                micro = next_micro_batches(batches, run.accum, step * run.accum, shard_reads)
                waited = time.perf_counter() - asked
                result = trainer.train_step(micro)
                window.add(result, waited)
                done = step + 1
                progress.update(1)
                if done % options["log_every"] == 0 or done == run.steps:
                    record = window.record(done, result, trainer)
                    progress.set_postfix(loss=f"{record['loss']:.3f}")
                signum = int(distributed.all_reduce_max(stop.signum))
                if signum or done % options["checkpoint_every"] == 0 or done == run.steps:
                    saving = time.perf_counter()
                    save_checkpoint(
                        run.root,
                        done,
                        trainer,
                        run.header(done, signature),
                        {"shard_reads": dict(shard_reads)},
                        options["keep_checkpoints"],
                    )
                    window.excluded += time.perf_counter() - saving
                if signum and done < run.steps:
                    raise TrainingInterrupted(signum, done)
    finally:
        progress.close()
        batches.close()


def data_report(data: RankData, shard_reads: Mapping[int, Sequence[int]]) -> dict[str, Any]:
    """data.json: per shard, the labels kept / dropped and the shard samples without label."""
    shards = {}
    totals = {"assigned": 0, "ambiguous": 0, "kept": 0, "tar_samples": 0, "unlabelled": 0}
    totals.update({reason: 0 for reason in drops.REASONS})
    for item in data.inputs:
        counts = dict(data.counts[item.name])
        read = shard_reads.get(item.index)
        counts["tar_samples"], counts["unlabelled"] = (read[0], read[1]) if read else (None, None)
        if read:  # samples left out on purpose are counted under their reason, not here
            left_out = counts["ambiguous"] + sum(counts.get(r, 0) for r in drops.REASONS)
            counts["unlabelled"] -= left_out
        shards[item.name] = counts
        for key in totals:
            totals[key] += counts.get(key) or 0
    return {
        "shards": shards,
        "totals": totals,
        "shards_never_read": sum(1 for c in shards.values() if c["tar_samples"] is None),
        "notes": {
            "kept": "samples trained on",
            "ambiguous": "dropped: label margin sim - sim2 below train.min_label_margin",
            "duplicate_content": "dropped by the screen: same image bytes as an earlier row",
            "filtered": "dropped by the screen: failed a metadata filter (filters.*)",
            "near_duplicate": "dropped: near-duplicate of a kept image in its cluster (dedup.near)",
            "unlabelled": "shard samples without a pseudo-label (embed could not decode them; "
            "see embed/{part}.skipped.csv); null for a shard the run never read",
        },
    }


def model_info(run: Run, trainer: Trainer) -> dict[str, Any]:
    """model.json: how to rebuild the model, its preprocessing and what it was trained on."""
    options, samples = run.options, run.steps * run.samples_per_step
    return {
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
            "steps": run.steps,
            "num_classes": run.num_classes,
            "world_size": run.info.world_size,
            "samples_seen": samples,
            "epochs": samples / run.data.total_samples,
        },
    }


def finish(run: Run, trainer: Trainer, shard_reads: ShardReads) -> None:
    """Rank 0 exports the model, data.json and metrics.jsonl (after gathering every rank's
    shard reads); every rank waits for it."""
    all_reads: ShardReads = {}
    for reads in distributed.all_gather_objects(shard_reads):
        all_reads.update(reads)
    if run.info.rank == 0:
        export_model(run.out_dir, trainer.model, model_info(run, trainer))
        write_json(run.out_dir / "data.json", data_report(run.data, all_reads))
        with atomic_path(run.out_dir / "metrics.jsonl") as tmp:
            shutil.copyfile(run.live_metrics, tmp)
        log.info("trained %d steps -> %s", run.steps, run.out_dir)
    distributed.barrier()
