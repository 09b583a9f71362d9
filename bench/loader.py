"""How fast each decoding path (``train.decode``) turns real-size JPEG shards into training crops.

The shards are photo-like JPEGs of LAION's size (256 px a side, img2dataset's quality 95, 20-30
KB each: ``unicom.synthetic.photo_like_image``), or ``--data`` with ``shards/*.tar``. Printed:

1. per core: what one loader worker does per image (the trainer's own ``decode`` of
   ``unicom.train.batches``: decode + RandomResizedCrop + flip, one thread), for pil (the
   default), torchvision (libjpeg-turbo + tensor resampling) and cuda (the worker's part: the
   header and the crop's draw; then the GPU's part, a batch decoded and cropped there);
2. the real loader (``TrainBatches`` through ``make_loader``) with 1..``--workers`` processes:
   images/s in all, and per worker;
3. what that means: cores per GPU to feed ``--target`` images/s.

    python bench/loader.py [--images 1024] [--workers 2] [--batch 128] [--target 3000]

A measurement, not a test: it prints numbers and checks nothing.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
from unicom.decoding import PendingImages  # noqa: E402
from unicom.synthetic import write_synthetic_set  # noqa: E402
from unicom.train.augment import TrainTransform  # noqa: E402
from unicom.train.batches import TrainBatches, decode, make_loader  # noqa: E402
from unicom.train.inputs import pair_inputs, prepare_rank_data  # noqa: E402
from unicom.train.streams import Sample, augment_rng, read_shard_images  # noqa: E402

PATHS = ("pil", "torchvision", "cuda")


def per_core(
    images: list[bytes], transform: TrainTransform, path: str, rounds: int
) -> tuple[float, float]:
    """CPU seconds and wall seconds per image of one worker's part of ``path`` (the best of
    ``rounds``). CPU time is what a core costs: wall time also counts the other processes
    that share the machine."""
    best = (math.inf, math.inf)
    for _ in range(rounds):
        cpu, wall = time.thread_time(), time.perf_counter()
        for row, data in enumerate(images):
            sample = Sample(data, 0, str(row), 0, augment_rng(0, 0, 0, row))
            decode(sample, transform, "", path)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        best = min(best, (cpu / len(images), wall / len(images)))
    return best


def gpu_part(images: list[bytes], transform: TrainTransform, batch: int, device) -> float:
    """Seconds per image for the main process to decode and crop ``cuda``-path batches."""
    pending = []
    for first in range(0, len(images) - batch + 1, batch):
        items = [
            decode(
                Sample(images[row], 0, str(row), 0, augment_rng(0, 0, 0, row)),
                transform,
                "",
                "cuda",
            )
            for row in range(first, first + batch)
        ]
        pending.append(PendingImages.pack(transform.size, items, [""] * batch))
    pending[0].finish(device)  # warm-up: nvJPEG's handles, the kernels
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for item in pending:
        item.pin_memory().finish(device)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / (len(pending) * batch)


def loader_rate(
    data, transform, path: str, batch: int, workers: int, batches: int
) -> tuple[float, float]:
    """Images/s of the real loader with ``workers`` processes (decode cuda: the workers' part),
    and the CPU seconds its workers spent per image (start-up included)."""
    dataset = TrainBatches(data.shards, transform, batch, data.streams, 0, 0, decode=path)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    loader = make_loader(dataset, workers)
    try:
        for _ in range(max(1, workers)):  # the workers' start and first batches
            next(loader)
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        rate = batches * batch / (time.perf_counter() - start)
    finally:
        loader.close()  # joins the workers: their CPU time is then in RUSAGE_CHILDREN
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return rate, cpu / ((batches + max(1, workers)) * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="folder with shards/*.tar (else photo-like ones are made)")
    parser.add_argument("--images", type=int, default=1024, help="images to make")
    parser.add_argument("--shards", type=int, default=8, help="shards to make")
    parser.add_argument("--size", type=int, default=224, help="crop side")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="largest loader to try")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per loader")
    parser.add_argument("--rounds", type=int, default=3, help="per-core passes (best kept)")
    parser.add_argument("--target", type=float, default=3000, help="images/s a GPU eats")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cuda = torch.device("cuda", 0) if torch.cuda.is_available() else None
    transform = TrainTransform(args.size)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        folder = Path(args.data or tmp)
        if not args.data:
            per_shard = math.ceil(args.images / args.shards)
            write_synthetic_set(folder, args.images, 1000, 256, per_shard, photo=True)
        shards = sorted(str(p) for p in (folder / "shards").glob("*.tar"))
        assigns = [str(folder / "assign" / f"{Path(s).stem}.parquet") for s in shards]
        data = prepare_rank_data(pair_inputs(shards, assigns), 1000, 0, 1, len(shards))
        images = [b for shard in data.shards for b in read_shard_images(shard).images]
        sizes = np.array([len(b) for b in images]) / 1e3
        print(
            f"{len(images)} JPEGs in {len(shards)} shards: {sizes.mean():.1f} KB mean "
            f"({sizes.min():.1f}-{sizes.max():.1f}); crops {args.size} px, batch {args.batch}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread per worker"
        )
        print("\nper core (one worker's part, one thread, best of rounds; CPU time, and wall):")
        rates = {}
        for path in args.paths:
            cpu, wall = per_core(images, transform, path, args.rounds)
            rates[path] = 1 / cpu
            part = "header + crop draw only" if path == "cuda" else "decode + crop + flip"
            print(
                f"  {path:12s} {cpu * 1e3:6.2f} ms/img CPU  {1 / cpu:7.0f} img/s per core  "
                f"(wall {wall * 1e3:.2f} ms; {part})"
            )
        if "cuda" in args.paths and cuda is not None:
            seconds = gpu_part(images, transform, args.batch, cuda)
            rates["cuda-gpu"] = 1 / seconds
            print(f"  cuda on GPU  {seconds * 1e3:6.2f} ms/img  {1 / seconds:7.0f} img/s  "
                  f"(decode + crop of whole batches on {torch.cuda.get_device_name(cuda)}, "
                  "main process)")  # fmt: skip
        elif "cuda" in args.paths:
            print("  cuda on GPU: no GPU here")
        print(f"\nreal loader (TrainBatches + DataLoader, {args.batches} batches of {args.batch}):")
        for path in args.paths:
            for workers in range(1, args.workers + 1):
                rate, cpu = loader_rate(data, transform, path, args.batch, workers, args.batches)
                print(
                    f"  {path:12s} {workers} worker(s): {rate:7.0f} img/s, "
                    f"{rate / workers:6.0f} per worker; workers' CPU {cpu * 1e3:.2f} ms/img "
                    f"({1 / cpu:.0f} img/s per core, tar reading and batching included)"
                )
        print(f"\ncores per GPU to feed {args.target:.0f} img/s (at the per-core CPU rates):")
        for path in ("pil", "torchvision", "cuda"):
            if path in rates:
                print(f"  {path:12s} {args.target / rates[path]:5.1f}")


if __name__ == "__main__":
    main()
