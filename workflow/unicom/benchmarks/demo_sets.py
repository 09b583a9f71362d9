"""The demo's offline evaluation sets: openclipart (the demo pool) and Fashion-MNIST.

openclipart     test: the held-out Parquet written by ``unicom.demo.build pool --out-heldout``
                (columns ``path``, ``category``; label = category); train: the demo pool's URL
                list (``demo/urls.parquet``: ``url`` as file:// URLs, ``category``), which
                the pretraining also used. Same categories: a supervised split, not a
                class-disjoint one; no file's bytes are in both (the pool drops links and
                byte-identical copies before the split: duplicate_link, duplicate_content).
fashion-mnist   ``ROOT/{t10k,train}-{images-idx3,labels-idx1}-ubyte.gz`` (Debian package
                ``dataset-fashion-mnist``; ROOT defaults to ``/usr/share/datasets/fashion-mnist``):
                the 10,000 test or 60,000 train images as 28x28 grayscale PIL images,
                labelled by class name. Same classes in both splits.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from unicom.benchmarks.readers import check_listed_files, check_split, require_file
from unicom.benchmarks.sets import RetrievalSet, single_set
from unicom.errors import UnicomError
from unicom.planning import FASHION_MNIST_DIR

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _openclipart_paths(path: Path, table) -> list[str]:
    if "path" in table.column_names:
        return [str(path.parent / p) for p in table["path"].to_pylist()]
    paths = []
    for url in table["url"].to_pylist():
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise UnicomError(f"{path}: url {url!r} is not a file:// URL of the demo pool")
        paths.append(unquote(parsed.path))
    return paths


def load_openclipart(path: Path, check_files: bool = True, split: str = "test") -> RetrievalSet:
    """The demo's openclipart images as one set: the held-out Parquet (test) or the pool's URL
    list (train). Relative paths are taken relative to the Parquet file's folder."""
    check_split(split)
    names = pq.read_schema(require_file(path)).names
    wanted = ("path" if split == "test" else "url", "category")
    missing = [c for c in wanted if c not in names]
    if missing:
        raise UnicomError(
            f"{path}: missing column(s) {missing} for the {split} split (has {names})"
        )
    table = pq.read_table(path, columns=list(wanted))
    items = _openclipart_paths(path, table)
    labels = [str(c) for c in table["category"].to_pylist()]
    if check_files:
        check_listed_files("openclipart", items)
    what = "held-out split of the demo pool" if split == "test" else "train: the demo pool"
    return single_set("openclipart", what, items, labels, path)


IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Decode a gzipped idx file of unsigned bytes (the MNIST format) into an array."""
    with gzip.open(require_file(path), "rb") as handle:
        try:
            data = handle.read()
        except (OSError, EOFError) as err:
            raise UnicomError(f"{path}: not a readable gzip file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != IDX_UBYTE:
        raise UnicomError(f"{path}: not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(data[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise UnicomError(
            f"{path}: header says shape {shape} ({expected} bytes), file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    root: Path | None = None, check_files: bool = True, split: str = "test"
) -> RetrievalSet:
    """Fashion-MNIST: 10,000 test (t10k) or 60,000 train 28x28 grayscale PIL images, labelled
    by class name."""
    check_split(split)
    root = FASHION_MNIST_DIR if root is None else root
    prefix = "t10k" if split == "test" else "train"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UnicomError(
            f"{root}: {prefix} images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise UnicomError(f"{root / f'{prefix}-labels-idx1-ubyte.gz'}: label {labels.max()} > 9")
    # 2-D uint8 arrays become mode "L" images.
    items = [Image.fromarray(image) for image in images]
    names = [FASHION_MNIST_CLASSES[int(label)] for label in labels]
    return single_set("fashion-mnist", f"{split}: {prefix}", items, names, root)
