"""The retrieval benchmarks by name, a library the evaluate, supervised and tools packages share:
where each one's files are found (``available`` tells a caller whether to skip a benchmark whose
path is unset or absent) and its reader (``readers`` lists the published layouts expected,
``demo_sets`` the demo's offline sets); ``sets`` is what a loaded benchmark is.
``python -m unicom.benchmarks NAME PATH`` checks a layout and prints the split's size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from unicom.benchmarks.demo_sets import load_fashion_mnist, load_openclipart
from unicom.benchmarks.readers import (
    GLDV2_SOLUTION,
    GLDV2_TRAIN,
    INAT_TEST_LIST,
    VEHICLEID_SIZES,
    load_cars,
    load_cub,
    load_gldv2,
    load_image_folder,
    load_inaturalist,
    load_inshop,
    load_sop,
    load_vehicleid,
)
from unicom.benchmarks.sets import RetrievalSet
from unicom.errors import UnicomError
from unicom.planning import FASHION_MNIST_DIR

log = logging.getLogger("unicom.benchmarks")


@dataclass(frozen=True)
class Benchmark:
    """How to find a benchmark: files proving its layout (any one), folders it extracts to."""

    loader: Callable[..., RetrievalSet]
    markers: tuple[str, ...]
    subdirs: tuple[str, ...] = ()
    default_path: Path | None = None
    is_file: bool = False


BENCHMARKS: dict[str, Benchmark] = {
    "cub": Benchmark(load_cub, ("images.txt",), ("CUB_200_2011",)),
    "cars": Benchmark(
        load_cars, ("cars_annos.mat", "devkit/cars_train_annos.mat"), ("stanford_cars", "cars196")
    ),
    "sop": Benchmark(load_sop, ("Ebay_test.txt",), ("Stanford_Online_Products",)),
    "inshop": Benchmark(
        load_inshop,
        ("Eval/list_eval_partition.txt", "list_eval_partition.txt"),
        ("In-shop Clothes Retrieval Benchmark", "inshop"),
    ),
    "inaturalist": Benchmark(load_inaturalist, (INAT_TEST_LIST,), ("iNaturalist",)),
    "gldv2": Benchmark(load_gldv2, (GLDV2_SOLUTION, GLDV2_TRAIN)),
    "openclipart": Benchmark(load_openclipart, (), is_file=True),
    "fashion-mnist": Benchmark(
        load_fashion_mnist,
        ("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"),
        default_path=FASHION_MNIST_DIR,
    ),
}
for _size in VEHICLEID_SIZES:
    BENCHMARKS["vehicleid" if _size == 2400 else f"vehicleid-{_size}"] = Benchmark(
        partial(load_vehicleid, size=_size),
        (f"train_test_split/test_list_{_size}.txt",),
        ("VehicleID_V1.0",),
    )


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise UnicomError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def resolve_root(name: str, path: str | os.PathLike | None) -> Path:
    """The dataset folder (or file) under ``path`` that has the benchmark's layout."""
    spec = _benchmark(name)
    if path is None:
        if spec.default_path is None:
            raise UnicomError(f"{name}: no path given")
        path = spec.default_path
    path = Path(path)
    if not path.exists():
        raise UnicomError(f"{name}: {path} does not exist")
    if spec.is_file:
        if not path.is_file():
            raise UnicomError(f"{name}: expected a file, {path} is a folder")
        return path
    for base in (path, *(path / sub for sub in spec.subdirs)):
        if any((base / marker).exists() for marker in spec.markers):
            return base
    raise UnicomError(f"{name}: expected file {path / spec.markers[0]} is missing")


def available(name: str, path: str | os.PathLike | None) -> tuple[bool, str]:
    """``(True, where)`` when the benchmark can be loaded from ``path``; ``(False, why)`` to skip.

    Only an unset or non-existent path means "skip". A path that exists but has the wrong
    layout is a configuration error and raises ``UnicomError`` naming the expected file.
    """
    spec = _benchmark(name)
    if path is None and spec.default_path is None:
        return False, f"{name}: skipped, no path configured"
    target = Path(path) if path is not None else spec.default_path
    if not target.exists():
        return False, f"{name}: skipped, {target} does not exist"
    return True, f"{name}: found at {resolve_root(name, target)}"


def load(
    name: str,
    path: str | os.PathLike | None,
    check_files: bool = True,
    split: str = "test",
    image_folder: bool = False,
) -> RetrievalSet:
    """Load split ``split`` (test or train) of benchmark ``name`` from ``path`` (its folder,
    or a parent of the extracted folder); with ``image_folder``, ``name`` is any dataset in
    torchvision's ImageFolder layout at ``path`` (``readers.load_image_folder``)."""
    if image_folder:
        if path is None or not Path(path).is_dir():
            raise UnicomError(f"{name}: image folder {path} does not exist")
        root = Path(path)
        result = load_image_folder(root, check_files=check_files, split=split, name=name)
    else:
        root = resolve_root(name, path)
        result = _benchmark(name).loader(root, check_files=check_files, split=split)
    if not result.items:
        raise UnicomError(f"{name}: no images in the {split} split under {root}")
    log.info(
        "%s: %d items, %d classes (%s)", name, len(result.items), len(set(result.labels)), root
    )
    return result
