"""Train-step time with the real shard loader vs an in-memory batch of the same shape.

Same model, head, optimizer and step function (``unicom.train.Trainer``, world size 1); the
only difference is where the micro-batches come from. Goal: loader / in-memory <= 1.1.

    python bench/train.py [--data DIR] [--images 2048] [--source-size 128] [--classes 64]
                          [--model tf_efficientnet_lite0] [--pretrained efficientnet-lite0-package]
                          [--image-size 112] [--batch 64] [--steps 10] [--warmup 2] [--rounds 2]
                          [--workers 1] [--streams 2] [--threads 2] [--json results.json]

Without ``--data`` it writes synthetic shards (``--images`` JPEGs of ``--source-size`` px, in
shards of 1000) into a temporary folder; ``--data`` takes a folder with ``shards/*.tar`` and
``assign/*.parquet`` instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unicom.cli import run_cli, setup_logging
from unicom.distributed import WorldInfo
from unicom.io import write_json
from unicom.synthetic import write_synthetic_set
from unicom.train.augment import TrainTransform
from unicom.train.batches import TrainBatches, make_loader
from unicom.train.inputs import pair_inputs, prepare_rank_data
from unicom.train.optim import total_steps
from unicom.train.train import train_options
from unicom.train.trainer import Trainer

log = logging.getLogger("unicom.bench.train")
SHARD_SIZE = 1000
SINGLE = WorldInfo(0, 1, 0, 1, "127.0.0.1", 29500, "single")


def time_steps(trainer: Trainer, batches, steps: int, accum: int) -> tuple[list[float], float]:
    """Wall time of each step (fetching its micro-batches included) and the time spent
    waiting for batches."""
    times, waiting = [], 0.0
    for _ in range(steps):
        start = time.perf_counter()
        micro = []
        for _ in range(accum):
            fetch = time.perf_counter()
            micro.append(next(batches))
            waiting += time.perf_counter() - fetch
        trainer.train_step(micro)
        times.append(time.perf_counter() - start)
    return times, waiting


def run(args: argparse.Namespace, data_dir: Path) -> dict:
    options = train_options(
        {
            "model": args.model,
            "pretrained": args.pretrained,
            "image_size": args.image_size,
            "batch_size": args.batch,
            "dim": args.dim,
            "streams": args.streams,
            "num_workers": args.workers,
            "device": "cpu",
            "steps": 1000,
        }
    )
    shards = sorted(str(p) for p in (data_dir / "shards").glob("*.tar"))
    assignments = [str(data_dir / "assign" / (Path(s).stem + ".parquet")) for s in shards]
    data = prepare_rank_data(pair_inputs(shards, assignments), args.classes, 0, 1, args.streams)
    trainer = Trainer(
        options,
        args.classes,
        total_steps(options, data.total_samples, 1),
        SINGLE,
        torch.device("cpu"),
    )
    accum = options["grad_accum_steps"]
    dataset = TrainBatches(
        data.shards,
        TrainTransform(args.image_size),
        args.batch,
        data.streams,
        seed=0,
        rank=0,
        shuffle_shards=args.shuffle_shards,
    )
    # Loader alone: batches per second with no training (decode + augment throughput).
    loader = make_loader(dataset, args.workers)
    try:
        next(loader)
        start = time.perf_counter()
        for _ in range(args.steps):
            next(loader)
        loader_only = (time.perf_counter() - start) / args.steps
    finally:
        loader.close()

    batch = next(iter(make_loader(dataset, 0)))  # one real batch, then reused from memory
    in_memory = iter(lambda: batch, None)
    # Other processes on the machine make timings drift: alternate the two sources in rounds.
    loader_times, memory_times, waiting = [], [], 0.0
    for _ in range(args.rounds):
        loader = make_loader(dataset, args.workers)
        try:
            time_steps(trainer, loader, args.warmup, accum)
            times, waited = time_steps(trainer, loader, args.steps, accum)
        finally:
            loader.close()
        loader_times += times
        waiting += waited
        time_steps(trainer, in_memory, 1, accum)
        memory_times += time_steps(trainer, in_memory, args.steps, accum)[0]

    loader_step = statistics.median(loader_times)
    memory_step = statistics.median(memory_times)
    return {
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "workers": args.workers,
        "threads": args.threads,
        "samples": data.total_samples,
        "loader_step_s": loader_step,
        "loader_mean_step_s": statistics.mean(loader_times),
        "in_memory_step_s": memory_step,
        "in_memory_mean_step_s": statistics.mean(memory_times),
        "ratio": loader_step / memory_step,
        "mean_ratio": statistics.mean(loader_times) / statistics.mean(memory_times),
        "loader_wait_fraction": waiting / sum(loader_times),
        # Same steps, without their time blocked on data: immune to drift between phases.
        "wait_ratio": sum(loader_times) / (sum(loader_times) - waiting),
        "loader_only_s_per_batch": loader_only,
        "images_per_s_loader": args.batch / loader_step,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="folder with shards/*.tar and assign/*.parquet")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--source-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--pretrained", default="efficientnet-lite0-package")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed loader steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="loader / in-memory alternations")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--shuffle-shards", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    if args.pretrained in ("", "null", "none"):
        args.pretrained = None

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data_dir = Path(args.data) if args.data else Path(tmp)
        if not args.data:
            write_synthetic_set(data_dir, args.images, args.classes, args.source_size, SHARD_SIZE)
        result = run(args, data_dir)
    print(
        f"{result['model']} {result['image_size']}px batch {result['batch']}, "
        f"{result['threads']} threads, {result['workers']} loader workers:\n"
        f"  real loader  {result['loader_step_s']:.3f} s/step "
        f"({result['images_per_s_loader']:.1f} img/s, waiting for data "
        f"{100 * result['loader_wait_fraction']:.1f}% of the time)\n"
        f"  in memory    {result['in_memory_step_s']:.3f} s/step\n"
        f"  loader alone {result['loader_only_s_per_batch']:.3f} s/batch (no training)\n"
        f"  ratio        {result['ratio']:.3f} (median), {result['mean_ratio']:.3f} (mean); "
        f"loader steps / their compute alone {result['wait_ratio']:.3f}"
    )
    if args.json:
        write_json(args.json, result)
    log.info("%s", json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
