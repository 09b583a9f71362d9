"""Benchmark the embed stage against its encoders alone.

Measures, in one run and on the same shard:

- stage throughput: ``unicom.embed.embed_shard`` (tar streaming, decoding in DataLoader
  workers, encoders, float16 conversion), the code the pipeline runs;
- model-only throughput: the same encoders on the same batches decoded beforehand
  (images already tensors, captions already strings);

and prints both and their ratio (goal: >= 0.9, i.e. decoding hides behind the model).

    python bench/embed.py                       # synthetic shard of 512 images, demo encoder
    python bench/embed.py results/shards/00000.tar --batch-size 64 --num-workers 1
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch loads OpenMP)
from __future__ import annotations

import os

# As `python -m unicom.embed.embed` does (see unicom/embed.py), so both measurements match the stage.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from unicom.devices import resolve_device
from unicom.embed.embed import Batch, embed_shard, shard_batches
from unicom.encoders import build_encoder
from unicom.encoders.base import Encoder
from unicom.synthetic import image_bytes, sample_members, write_tar

GOAL = 0.9
WORDS = (
    "a red blue green small large drawing of the cat dog house tree car boat flower "
    "person with and on in under black white vintage clip art icon illustration cartoon"
).split()


def write_synthetic_shard(path: Path, count: int, size: int = 128, seed: int = 0) -> Path:
    """An img2dataset-like shard: ``{key}.jpg``, ``{key}.txt``, ``{key}.json`` per sample."""
    rng = np.random.default_rng(seed)
    members = []
    for i in range(count):
        key = f"00000_{i:09d}"
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
            x1, y1 = (int(v) for v in rng.integers(size // 2, size, 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 16))))
        meta = {"url": f"https://example.org/{i}.jpg", "caption": caption, "key": key}
        members += sample_members(key, image_bytes(image, quality=95), caption, meta)
    write_tar(path, members)
    return path


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def time_stage(
    shard: Path, encoder: Encoder, batch_size: int, num_workers: int
) -> tuple[int, float, float, float]:
    """(images, wall s, main-process CPU s, decode-worker CPU s) of one stage run."""
    main_cpu, worker_cpu = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = embed_shard(shard, encoder, batch_size, num_workers, show_progress=False)
    seconds = time.perf_counter() - start
    main_cpu = cpu_seconds(resource.RUSAGE_SELF) - main_cpu
    worker_cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - worker_cpu  # workers have exited
    return result.rows, seconds, main_cpu, worker_cpu


def time_model(batches: list[Batch], encoder: Encoder) -> tuple[int, float, float]:
    """(images, wall s, CPU s) of the encoders alone on already decoded batches."""
    rows = 0
    cpu = cpu_seconds(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for batch in batches:
        if batch.keys:
            encoder.encode_images(batch.images)
            encoder.encode_texts(batch.captions)
            rows += len(batch.keys)
    return rows, time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("shard", nargs="?", help="webdataset tar (default: a synthetic one)")
    parser.add_argument("--images", type=int, default=512, help="size of the synthetic shard")
    parser.add_argument("--encoder", default="demo", choices=["demo", "open_clip"])
    parser.add_argument("--options-json", default="{}", help="extra embed options (JSON), merged")
    parser.add_argument("--image-size", type=int, default=128, help="demo encoder input size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (main process)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    options = {"encoder": args.encoder, "demo": {"image_size": args.image_size}}
    options.update(json.loads(args.options_json))
    torch.set_num_threads(args.threads)
    encoder = build_encoder(options, resolve_device(args.device, "--device"))

    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(args.shard) if args.shard else None
        if shard is None:
            shard = write_synthetic_shard(Path(tmp) / "00000.tar", args.images)
        # Decoded once up front for the model-only measurement (same batches as the stage).
        batches = list(shard_batches(shard, encoder.image_transform, args.batch_size, 0))
        time_model(batches[:1], encoder)  # warm-up: first calls allocate and pick kernels

        stage_runs, model_runs = [], []
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):  # interleaved, so background load hits both alike
            stage_runs.append(time_stage(shard, encoder, args.batch_size, args.num_workers))
            model_runs.append(time_model(batches, encoder))
        load_after = os.getloadavg()[0]

    stage_rates = [rows / seconds for rows, seconds, _, _ in stage_runs]
    model_rates = [rows / seconds for rows, seconds, _ in model_runs]
    stage_rate, model_rate = max(stage_rates), max(model_rates)
    ratio = stage_rate / model_rate
    print(
        f"shard: {args.shard or f'synthetic, {args.images} images'}; encoder {args.encoder}, "
        f"image_size {args.image_size}, batch {args.batch_size}, workers {args.num_workers}, "
        f"threads {args.threads}, device {args.device}, cores {os.cpu_count()}, "
        f"load average {load_before:.1f} -> {load_after:.1f}"
    )
    for i, (stage, model) in enumerate(zip(stage_rates, model_rates, strict=True)):
        rows, _, main_cpu, worker_cpu = stage_runs[i]
        model_cpu = model_runs[i][2] / model_runs[i][0]
        print(
            f"run {i}: stage {stage:6.1f} img/s, model only {model:6.1f} img/s | CPU ms/image: "
            f"stage main {1000 * main_cpu / rows:.1f} + decode workers "
            f"{1000 * worker_cpu / rows:.2f}, model only {1000 * model_cpu:.1f}"
        )
    print(f"stage      : {stage_rate:8.1f} img/s  ({stage_runs[0][0]} images, best run)")
    print(f"model only : {model_rate:8.1f} img/s  (best run)")
    print(f"ratio      : {ratio:8.3f}  (goal >= {GOAL}) {'OK' if ratio >= GOAL else 'BELOW GOAL'}")
    # On a shared machine wall-clock rates swing with other load; these two are steadier.
    pairwise = statistics.median(s / m for s, m in zip(stage_rates, model_rates, strict=True))
    stage_cpu = sum(main + workers for _, _, main, workers in stage_runs)
    model_cpu = sum(cpu for _, _, cpu in model_runs)
    print(
        f"median of per-run ratios: {pairwise:.3f}; CPU time ratio (model / stage): "
        f"{model_cpu / stage_cpu:.3f}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
