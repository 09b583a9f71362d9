"""A torchvision dataset exported to the ImageFolder layout the linear probes read: the real
torchvision FashionMNIST class on Debian's idx files, offline."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torchvision

from unicom.benchmarks.readers import load_image_folder
from unicom.errors import UnicomError
from unicom.tools.export_torchvision import export

from helpers import REPO


def fashion_mnist_idx() -> Path:
    from unicom.demo.debian import fetch_fashion_mnist
    from unicom.planning import installed_fashion_mnist

    installed = installed_fashion_mnist("/")
    if installed:
        return Path(installed)
    return Path(fetch_fashion_mnist(REPO / "resources", allow_download=True)["fashion_mnist_dir"])


@pytest.fixture(scope="module")
def torchvision_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tv")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for packed in fashion_mnist_idx().glob("*-ubyte.gz"):  # torchvision reads them unpacked
        with gzip.open(packed) as source, open(raw / packed.name[:-3], "wb") as target:
            shutil.copyfileobj(source, target)
    return root


def test_export_writes_both_splits_with_the_datasets_labels(torchvision_root, tmp_path):
    counts = export("FashionMNIST", str(torchvision_root), tmp_path / "out", max_per_split=60)
    assert counts == {"train": {"images": 60, "classes": 10}, "test": {"images": 60, "classes": 10}}
    truth = torchvision.datasets.FashionMNIST(str(torchvision_root), train=False)
    test = load_image_folder(tmp_path / "out", split="test", name="fmnist")
    assert len(test.items) == 60
    for item, label in zip(test.items, test.labels, strict=True):
        index = int(Path(item).stem)
        assert label == truth.classes[truth[index][1]].replace("/", "_")
    assert len(load_image_folder(tmp_path / "out", split="train").items) == 60


def test_a_missing_dataset_or_class_is_one_line(tmp_path):
    with pytest.raises(UnicomError, match="CIFAR10 under .* \\(train\\)") as info:
        export("CIFAR10", str(tmp_path), tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    with pytest.raises(UnicomError, match="no dataset class 'Cifar'"):
        export("Cifar", str(tmp_path), tmp_path / "out")
