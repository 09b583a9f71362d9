"""Train the embedding model on the pseudo-labels (the ``train`` stage): options, launch and CLI.

The model is ``unicom.models.EmbeddingModel`` (timm backbone -> Linear -> BatchNorm1d); backbone +
embedding run under DDP; the PartialFC head (``unicom.train.partial_fc``) is model-parallel (each
rank owns a class range) and is not wrapped. The package reads main -> ``loop.train_on_rank``
(resume, steps, export) -> ``trainer.Trainer.train_step``; data order in ``data``/``streams``/
``loader``, augmentation in ``augment``, schedule in ``optim``, ``checkpoint`` and ``signals``.

Launch:
    python -m unicom.train.train --shards S.tar ... --assignments S.parquet ... --num-classes K \
        --out-dir results/train --options-json '{...train section...}'
    torchrun --standalone --nproc-per-node N -m unicom.train.train ...      (one node)
    srun python -m unicom.train.train ...                                    (SLURM, any number of nodes)

Output folder:
    model.safetensors, model.json   the trained backbone + embedding; ``load_trained_model(dir)``
    metrics.jsonl                   one line per ``log_every`` steps (written at the end): loss,
                                    rates, head sampling, and seconds per step waiting for the
                                    loader vs in the step (``unicom.train.metrics``)
    metrics.partial.jsonl           the same, live
    data.json                       every input sample counted: kept / dropped and why
    checkpoints/step-NNNNNNNN/      model.pt (rank 0: model, optimizer, scheduler, step, data
                                    position) + rank-RRRRR.pt (each rank: its head shard and its
                                    optimizer/scheduler, RNG states)

A run resumes from the latest checkpoint of its folder and then reproduces the uninterrupted
run exactly (CPU): the data order is a function of the seed and the position
(``unicom.train.inputs``), the head's sampling generators are in its state dict, the RNG states
are restored. SIGTERM or SIGUSR1 (SLURM's warning before the time limit) -> checkpoint at the
next step boundary, then exit with 128 + the signal number, so that the job counts as failed and
a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from unicom import distributed
from unicom.cli import (
    add_each_part_option,
    expand_parts,
    run_cli,
    setup_logging,
)
from unicom.config import decode_conflict, section_options
from unicom.devices import rank_device
from unicom.distributed import WorldInfo
from unicom.errors import UnicomError
from unicom.options import StageOptions
from unicom.train.inputs import check_centroids, pair_inputs
from unicom.train.loop import train_on_rank
from unicom.train.signals import TrainingInterrupted

log = logging.getLogger("unicom.train.train")
OPTIONS = StageOptions("train")


def train_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train`` section (maybe partial) with the schema's defaults, checked."""
    options = section_options("train", options)
    conflict = decode_conflict(options["decode"], options["augment"])
    if conflict:
        raise UnicomError(conflict)
    return options


def compute_threads(
    job_threads: int, info: WorldInfo, num_workers: int, device: torch.device
) -> int:
    """Torch threads of one rank: its share of the job's cores, less its loader workers on
    CPU (more threads than cores stall every parallel op at its barrier)."""
    per_rank = job_threads // max(1, info.local_world_size)
    if device.type == "cpu":
        per_rank -= num_workers
    return max(1, per_rank)


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
    skip_files: Sequence[str] = (),
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
    if options["decode"] == "cuda" and device.type != "cuda":
        raise UnicomError("config key train.decode: cuda decodes on the GPU, but there is none")
    if threads:
        torch.set_num_threads(compute_threads(threads, info, options["num_workers"], device))
    if num_classes < 2:
        raise UnicomError(f"--num-classes must be at least 2, got {num_classes}")
    if centroids:
        check_centroids(centroids, num_classes)
    inputs = pair_inputs(shards, assignments)
    distributed.init_distributed(info, device)
    try:
        return train_on_rank(
            inputs,
            num_classes,
            out_dir,
            options,
            info,
            device,
            show_progress,
            restart_on_mismatch,
            skip_files,
        )
    finally:
        distributed.shutdown()


def num_classes_from(path: str) -> int:
    """``num_classes`` of a JSON file (unicom.supervised.finetune_data's classes.json)."""
    try:
        return int(json.loads(Path(path).read_text())["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UnicomError(f"--num-classes-file {path}: no num_classes ({err})") from None


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
    classes = parser.add_mutually_exclusive_group(required=True)
    classes.add_argument("--num-classes", type=int, help="k of the k-means")
    classes.add_argument(
        "--num-classes-file", help="a JSON file with num_classes (a labelled split's classes.json)"
    )
    parser.add_argument("--out-dir", required=True, help="output and checkpoint folder")
    parser.add_argument("--centroids", help="kmeans/centroids.npy: checks --num-classes")
    parser.add_argument("--threads", type=int, help="CPU threads of the job (split over ranks)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--restart-on-mismatch",
        action="store_true",
        help="set aside checkpoints of a run with other settings instead of failing",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="drops files (screen, near-duplicates): their rows are left out and counted",
    )
    add_each_part_option(parser)
    OPTIONS.add_to(parser)
    args = parser.parse_args(argv)
    options = OPTIONS.from_args(args)
    setup_logging()
    try:
        train(
            expand_parts(args.shards, args.each_part),
            expand_parts(args.assignments, args.each_part),
            args.num_classes or num_classes_from(args.num_classes_file),
            args.out_dir,
            options,
            centroids=args.centroids,
            threads=args.threads,
            show_progress=not args.no_progress,
            restart_on_mismatch=args.restart_on_mismatch,
            skip_files=args.skip,
        )
    except TrainingInterrupted as stop:
        log.warning("%s; checkpoint saved, rerun to resume", stop)
        raise SystemExit(128 + stop.signum) from None


if __name__ == "__main__":
    run_cli(main)
