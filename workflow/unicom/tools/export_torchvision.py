"""Write a torchvision dataset (CIFAR-10/100, Food-101, STL-10, ... as the user has them on disk)
as the ImageFolder layout the linear probes read (``linear_probe.image_folders``):
``OUT/train/<class>/<index>.png`` and ``OUT/test/<class>/<index>.png``.

Runs once, on a machine that has the dataset; never downloads (``download=False``): a missing
dataset is a one-line error. The whole folder appears atomically.

    python -m unicom.tools.export_torchvision CIFAR10 --root /data/cifar --out /data/cifar10-folder
"""

from __future__ import annotations

import argparse
import inspect
import logging
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from unicom.cli import run_cli, setup_logging
from unicom.errors import UnicomError
from unicom.images import to_rgb
from unicom.io import atomic_dir

log = logging.getLogger("unicom.tools.export_torchvision")
SPLITS = ("train", "test")


def open_split(name: str, root: str, split: str) -> Any:
    """torchvision.datasets.<name> for ``split``, whether the class takes ``train=`` or
    ``split=`` (Food-101, STL-10, ...)."""
    import torchvision

    dataset_class = getattr(torchvision.datasets, name, None)
    if not inspect.isclass(dataset_class):
        raise UnicomError(f"torchvision.datasets has no dataset class {name!r}")
    parameters = inspect.signature(dataset_class).parameters
    if "train" in parameters:
        selector: dict[str, Any] = {"train": split == "train"}
    elif "split" in parameters:
        selector = {"split": split}
    else:
        raise UnicomError(f"torchvision.datasets.{name} has neither a train nor a split argument")
    try:
        return dataset_class(root, download=False, **selector)
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as err:
        raise UnicomError(f"{name} under {root} ({split}): {str(err).splitlines()[0]}") from None


def class_names(dataset: Any, labels: list[int]) -> dict[int, str]:
    """Label -> folder name: the dataset's class names where it has them, else the number."""
    names = getattr(dataset, "classes", None)
    result = {}
    for label in sorted(set(labels)):
        raw = names[label] if names is not None and label < len(names) else str(label)
        result[label] = raw.replace("/", "_").strip() or str(label)
    return result


def export(name: str, root: str, out: str | Path, max_per_split: int | None = None) -> dict:
    """Write both splits; return the image and class counts per split."""
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            dataset = open_split(name, root, split)
            size = len(dataset) if max_per_split is None else min(len(dataset), max_per_split)
            samples = [dataset[i] for i in tqdm(range(size), desc=split, mininterval=5)]
            labels = [int(label) for _, label in samples]
            folders = class_names(dataset, labels)
            for index, (image, label) in enumerate(samples):
                if not isinstance(image, Image.Image):
                    raise UnicomError(f"{name}: sample {index} is not a PIL image (no transform?)")
                folder = tmp / split / folders[label]
                folder.mkdir(parents=True, exist_ok=True)
                to_rgb(image).save(folder / f"{index:07d}.png")
            counts[split] = {"images": size, "classes": len(folders)}
    log.info("%s -> %s: %s", name, out, counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unicom.tools.export_torchvision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help="a torchvision.datasets class, e.g. CIFAR10, Food101")
    parser.add_argument("--root", required=True, help="where the dataset already is")
    parser.add_argument("--out", required=True, help="the ImageFolder folder to write")
    parser.add_argument("--max-per-split", type=int, default=None, help="first N of each split")
    args = parser.parse_args(argv)
    setup_logging()
    export(args.name, args.root, args.out, args.max_per_split)


if __name__ == "__main__":
    run_cli(main)
