"""A benchmark's train split as the trainer's input, for supervised fine-tuning.

The ``finetune`` rules run the trainer (``unicom.train.train``) unchanged on a labelled split:
``OUT/shards/{part}.tar`` (webdataset, ``{key}.jpg``) and ``OUT/labels/{part}.parquet`` in
assign's layout (``key, label, sim, sim2``; a real label is certain: sim 1, sim2 0), listed in
``OUT/parts/manifest.json``; ``OUT/classes.json`` names the classes (label i = the i-th name in
sorted order) and counts every item: written, or dropped with the reason (unreadable image).
Images are resized so that the shorter side is ``image_size`` (never enlarged) and stored as
JPEG; the order is a seeded shuffle, so that every shard mixes the classes.
"""

from __future__ import annotations

import argparse
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from unicom import benchmarks, formats
from unicom.benchmarks import sets
from unicom.cli import run_cli, setup_logging
from unicom.errors import UnicomError
from unicom.io import atomic_dir, write_json, write_parquet
from unicom.options import StageOptions
from unicom.shards import sample_members, write_tar

log = logging.getLogger("unicom.supervised.finetune_data")
OPTIONS = StageOptions("finetune")


def shrink(image: Image.Image, size: int) -> Image.Image:
    """RGB, the shorter side at most ``size`` (aspect kept)."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    if scale < 1:
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
            Image.Resampling.BICUBIC,
        )
    return image


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def chosen_items(
    dataset: sets.RetrievalSet, limit: int | None, seed: int
) -> tuple[list[sets.Item], list[str]]:
    """The split's items (all, or a stratified seeded subset of ``limit``), shuffled (seed)."""
    capped = sets.cap_set(dataset, limit, seed)
    order = np.random.default_rng([seed, 1]).permutation(len(capped.items))
    return [capped.items[i] for i in order], [capped.labels[i] for i in order]


def write_labelled_split(
    items: Sequence[sets.Item],
    labels: Sequence[str],
    out_dir: str | Path,
    image_size: int,
    shard_size: int,
) -> dict[str, Any]:
    """Shards, label files, manifest and classes.json of ``items`` in this order (atomically)."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UnicomError(f"a labelled split needs at least 2 classes, got {len(classes)}")
    index = {name: i for i, name in enumerate(classes)}
    dropped: list[dict[str, str]] = []
    parts: list[str] = []
    written = 0
    with atomic_dir(out_dir) as tmp:
        for start in tqdm(range(0, len(items), shard_size), desc="labelled shards", unit="shard"):
            part = formats.part_name(len(parts))
            members, keys, ids = [], [], []
            for row, (item, label) in enumerate(
                zip(
                    items[start : start + shard_size],
                    labels[start : start + shard_size],
                    strict=True,
                )
            ):
                try:
                    image = shrink(sets.load_image(item), image_size)
                except (OSError, UnidentifiedImageError) as err:
                    dropped.append({"item": str(item), "reason": f"unreadable image: {err}"})
                    continue
                key = formats.global_key(part, f"{row:09d}")
                members += sample_members(key, jpeg(image), label, {"key": key, "label": label})
                keys.append(key)
                ids.append(index[label])
            write_tar(tmp / "shards" / f"{part}.tar", members)
            table = pa.table(
                {
                    "key": pa.array(keys, pa.string()),
                    "label": pa.array(ids, pa.int32()),
                    "sim": pa.array(np.ones(len(keys)), pa.float32()),
                    "sim2": pa.array(np.zeros(len(keys)), pa.float32()),
                }
            )
            identity = {"k": len(classes), "labelled": True}
            write_parquet(
                tmp / "labels" / f"{part}.parquet",
                formats.with_metadata(table, {formats.ASSIGN_METADATA_KEY: identity}),
            )
            parts.append(part)
            written += len(keys)
        write_json(tmp / "parts" / "manifest.json", {"parts": parts, "shards_per_job": 1})
        summary = {
            "classes": classes,
            "num_classes": len(classes),
            "items": len(items),
            "written": written,
            "dropped": dropped,
            "image_size": image_size,
        }
        write_json(tmp / "classes.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unicom.supervised.finetune_data", description=__doc__
    )
    parser.add_argument("--dataset", required=True, choices=sorted(benchmarks.BENCHMARKS))
    parser.add_argument("--path", required=True, help="where the benchmark's train split is")
    parser.add_argument("--out-dir", required=True)
    OPTIONS.add_to(parser)
    args = parser.parse_args(argv)
    options = OPTIONS.from_args(args)
    setup_logging()
    dataset = benchmarks.load(args.dataset, args.path, split="train")
    items, labels = chosen_items(dataset, options["max_train"], options["seed"])
    summary = write_labelled_split(
        items, labels, args.out_dir, options["stored_image_size"], options["shard_size"]
    )
    log.info(
        "%s train split: %d of %d items in %d classes -> %s (%d dropped)",
        args.dataset, summary["written"], len(dataset.items), summary["num_classes"],
        args.out_dir, len(summary["dropped"]),
    )  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
