"""Supervised fine-tuning has a real learning signal: on a labelled pool whose classes a frozen
model does not separate (stripe orientation under random colours), fine-tuning with the true
labels raises the test split's R@1 well above the frozen model's; the same fine-tuning on
shuffled train labels does not."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from unicom.benchmarks import sets
from unicom.embedders import trained_embedder
from unicom.evaluate.evaluate import evaluate
from unicom.supervised.finetune_data import write_labelled_split
from unicom.train.train import main as train_main

CLASSES, PER_CLASS_TRAIN, PER_CLASS_TEST, SIZE = 6, 24, 10, 48
# The demo encoder's image tower (ImageNet EfficientNet-Lite0), as finetune.models: base has it.
OPTIONS = {
    "model": "tf_efficientnet_lite0",
    "pretrained": "efficientnet-lite0-package",
    "dim": 32,
    "image_size": SIZE,
    "batch_size": 16,
    "lr": 0.001,
    "head_lr_mult": 10.0,
    "weight_decay": 0.0,
    "scale": 16.0,
    "margin": 0.2,
    "sample_rate": 1.0,
    "feature_rate": 1.0,
    "streams": 1,
    "num_workers": 0,
    "checkpoint_every": 1000,
    "log_every": 10,
    "augment": {"scale": [0.7, 1.0], "hflip": 0.0},
}
EVALUATE = {"ks": [1], "dims": ["full"], "batch_size": 32, "num_workers": 0}
# Three trainings of an ImageNet EfficientNet-Lite0: minutes on 2 cores.
pytestmark = pytest.mark.slow


def striped(label: int, rng: np.random.Generator) -> Image.Image:
    """Stripes at an angle set by the class, random colours and phase: colour says nothing."""
    background, foreground = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    angle = math.pi * label / CLASSES
    dx, dy = math.cos(angle), math.sin(angle)
    phase = rng.uniform(0, 6)
    for offset in np.arange(-2 * SIZE, 2 * SIZE, 6) + phase:
        cx, cy = SIZE / 2 - dy * offset, SIZE / 2 + dx * offset
        draw.line(
            [(cx - dx * SIZE, cy - dy * SIZE), (cx + dx * SIZE, cy + dy * SIZE)],
            fill=foreground,
            width=2,
        )
    return image


def labelled(per_class: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(seed)
    labels = [f"angle{c}" for c in range(CLASSES) for _ in range(per_class)]
    return [striped(int(label[5:]), rng) for label in labels], labels


def fine_tune(data_dir, out_dir, options) -> None:
    train_main(
        [
            "--each-part", str(data_dir / "parts"),
            "--shards", str(data_dir / "shards/{part}.tar"),
            "--assignments", str(data_dir / "labels/{part}.parquet"),
            "--num-classes-file", str(data_dir / "classes.json"),
            "--out-dir", str(out_dir), "--options-json", json.dumps(options),
            "--threads", "2", "--no-progress",
        ]
    )  # fmt: skip


def recall_at_1(model_dir, test: sets.RetrievalSet) -> float:
    result = evaluate(trained_embedder(str(model_dir), "cpu"), test, EVALUATE)
    return result["results"]["full"]["recall@1"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    items, labels = labelled(PER_CLASS_TRAIN, seed=0)
    order = np.random.default_rng(1).permutation(len(items))
    items, labels = [items[i] for i in order], [labels[i] for i in order]
    write_labelled_split(items, labels, root / "true", SIZE, 40)
    shuffled = list(np.random.default_rng(2).permutation(labels))
    write_labelled_split(items, shuffled, root / "shuffled", SIZE, 40)
    test_items, test_labels = labelled(PER_CLASS_TEST, seed=3)
    test = sets.single_set("stripes", "test", test_items, test_labels, root)
    # The frozen model: ImageNet weights and a seeded random embedding, exported by a run whose
    # one step does nothing.
    fine_tune(root / "true", root / "frozen", {**OPTIONS, "steps": 1, "lr": 1e-12})
    return root, test


def test_labelled_split_accounts_for_every_item(pool):
    root, _ = pool
    classes = json.loads((root / "true/classes.json").read_text())
    assert classes["num_classes"] == CLASSES and classes["written"] == CLASSES * PER_CLASS_TRAIN
    assert classes["dropped"] == []
    manifest = json.loads((root / "true/parts/manifest.json").read_text())
    assert manifest["parts"] == ["00000", "00001", "00002", "00003"]


def test_fine_tuning_beats_the_frozen_model_and_shuffled_labels_do_not(pool):
    root, test = pool
    frozen = recall_at_1(root / "frozen", test)
    options = {**OPTIONS, "steps": 40, "pretrained": str(root / "frozen")}
    fine_tune(root / "true", root / "tuned", options)
    fine_tune(root / "shuffled", root / "tuned-shuffled", options)
    tuned = recall_at_1(root / "tuned", test)
    shuffled = recall_at_1(root / "tuned-shuffled", test)
    print(f"\nR@1 frozen {frozen:.3f}, fine-tuned {tuned:.3f}, on shuffled labels {shuffled:.3f}")
    assert tuned > frozen + 0.1
    assert shuffled < frozen + 0.05 and shuffled < tuned - 0.1
