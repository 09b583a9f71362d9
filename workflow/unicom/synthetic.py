"""Small real shards for tests and benchmarks: webdataset tars written the way img2dataset writes
them (``{key}.jpg`` / ``.txt`` / ``.json`` members), with images a model can learn."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter

from unicom import formats
from unicom.io import write_parquet
from unicom.shards import image_bytes, sample_members, write_tar

__all__ = [
    "image_bytes",
    "sample_members",
    "write_tar",
    "striped_image",
    "photo_like_image",
    "write_synthetic_shard",
    "write_synthetic_set",
]


def striped_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Colour and stripe orientation depend on ``label`` (with noise): a model can learn them."""
    hue = np.array([(97 * label) % 256, (57 * label + 80) % 256, (31 * label + 160) % 256])
    colour = np.clip(hue + rng.integers(-25, 25, 3), 0, 255)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in colour))
    draw = ImageDraw.Draw(image)
    step = max(2, size // (2 + label % 4))
    for offset in range(0, 2 * size, step):
        line = [(offset, 0), (0, offset)] if label % 2 else [(offset, 0), (offset, size)]
        draw.line(line, fill=(255, 255, 255), width=max(1, size // 16))
    return image


def photo_like_image(size: int, rng: np.random.Generator) -> Image.Image:
    """A stand-in for a downloaded photo, for measuring decoding: smooth colour gradients, a
    few blurred shapes and sensor-like noise; as a ``size`` = 256 JPEG at img2dataset's quality
    95 it weighs 20-30 KB, like LAION's (flat stripes compress to a few KB and decode faster)."""
    corners = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(corners).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 10))):
        x, y = (int(v) for v in rng.integers(-size // 4, size, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + w, y + h], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(3, 7), (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_synthetic_shard(
    shard_path: str | os.PathLike,
    assignment_path: str | os.PathLike,
    part: str,
    samples: int,
    num_classes: int,
    size: int = 32,
    unlabelled: int = 0,
    seed: int = 0,
    photo: bool = False,
) -> None:
    """A shard + assignment pair for training: ``samples`` labelled striped JPEGs (photo:
    ``photo_like_image``s at quality 95, whose labels say nothing about them); the last
    ``unlabelled`` samples of the tar get no assignment row."""
    rng = np.random.default_rng([seed, int(part)])
    keys, labels, members = [], [], []
    for i in range(samples + unlabelled):
        key = formats.global_key(part, f"{i:09d}")
        label = int(rng.integers(num_classes))
        if photo:
            jpeg = image_bytes(photo_like_image(size, rng), quality=95)
        else:
            jpeg = image_bytes(striped_image(label, size, rng))
        caption, meta = (
            f"synthetic sample {i} of class {label}",
            {"key": key, "caption": f"class {label}"},
        )
        members += sample_members(key, jpeg, caption, meta)
        if i < samples:
            keys.append(key)
            labels.append(label)
    write_tar(shard_path, members)
    sims = np.stack([rng.uniform(0.6, 0.9, len(keys)), rng.uniform(0.3, 0.6, len(keys))], axis=1)
    # The second nearest: another class, as assign's top 2 would be.
    second = (np.array(labels, np.int64) + rng.integers(1, num_classes, len(keys))) % num_classes
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "label": pa.array(labels, pa.int32()),
            "sim": pa.array(sims[:, 0], pa.float32()),
            "sim2": pa.array(sims[:, 1], pa.float32()),
            "labels": pa.FixedSizeListArray.from_arrays(
                pa.array(np.stack([labels, second], axis=1).reshape(-1), pa.int32()), 2
            ),
            "sims": pa.FixedSizeListArray.from_arrays(pa.array(sims.reshape(-1), pa.float32()), 2),
        }
    )
    metadata = {formats.ASSIGN_METADATA_KEY: {"k": num_classes, "synthetic": True}}
    write_parquet(assignment_path, formats.with_metadata(table, metadata))


def write_synthetic_set(
    folder: str | os.PathLike,
    images: int,
    num_classes: int,
    size: int,
    shard_size: int,
    photo: bool = False,
    processes: int = 1,
) -> tuple[list[str], list[str]]:
    """``images`` labelled samples in shards of ``shard_size`` (the last one smaller):
    ``folder/shards/{part}.tar`` + ``folder/assign/{part}.parquet``, shard i seeded with i,
    written by ``processes`` processes (the same files whatever their number). Returns the
    shard and assignment paths, in part order."""
    shards, assignments, jobs = [], [], []
    for index, start in enumerate(range(0, images, shard_size)):
        part = f"{index:05d}"
        shards.append(os.path.join(folder, "shards", f"{part}.tar"))
        assignments.append(os.path.join(folder, "assign", f"{part}.parquet"))
        count = min(shard_size, images - start)
        jobs.append((shards[-1], assignments[-1], part, count, num_classes, size, 0, index, photo))
    if processes > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.starmap(write_synthetic_shard, jobs)
    else:
        for job in jobs:
            write_synthetic_shard(*job)
    return shards, assignments
