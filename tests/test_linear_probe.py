"""The linear probe (CLIP's protocol) on separable and on shuffled labels."""

from __future__ import annotations

import numpy as np
import pytest

from unicom.errors import UnicomError
from unicom.supervised.linear_probe import choose_c, holdout_split, linear_probe

CS = [0.01, 0.1, 1.0, 10.0, 100.0]
CLASSES = 10


def blobs(n: int, seed: int = 0, noise: float = 2.0) -> tuple[np.ndarray, list[str]]:
    """Unit vectors around 10 class means in 64 dims: separable, not trivially."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).normal(size=(CLASSES, 64))
    y = rng.integers(CLASSES, size=n)
    x = means[y] + noise * rng.normal(size=(n, 64))
    return x / np.linalg.norm(x, axis=1, keepdims=True), [f"class{v}" for v in y]


def test_separable_classes_are_learned():
    train_x, train_y = blobs(1500, seed=0)
    test_x, test_y = blobs(500, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, CS)
    assert result.top1 > 0.9 and result.classes == CLASSES
    assert set(result.validation) == {f"{c:g}" for c in CS}
    assert result.validation[f"{result.c:g}"] == max(result.validation.values())


def test_shuffled_train_labels_fall_to_chance():
    train_x, train_y = blobs(1500, seed=0)
    test_x, test_y = blobs(500, seed=1)
    shuffled = list(np.random.default_rng(5).permutation(train_y))
    result = linear_probe(train_x, shuffled, test_x, test_y, CS)
    # 500 test items: the standard error of an accuracy near 0.1 is ~0.013.
    assert abs(result.top1 - result.chance) < 0.05, result.summary()


def test_c_is_chosen_without_the_test_labels():
    """The same train split gives the same C and held-out curve whatever the test labels are."""
    train_x, train_y = blobs(800, seed=0)
    test_x, test_y = blobs(300, seed=1)
    permuted = list(np.random.default_rng(2).permutation(test_y))
    first = linear_probe(train_x, train_y, test_x, test_y, CS)
    second = linear_probe(train_x, train_y, test_x, permuted, CS)
    assert (first.c, first.validation) == (second.c, second.validation)
    assert first.top1 != second.top1
    y = np.array([int(label[5:]) for label in train_y])
    assert choose_c(train_x, y, CS) == (first.c, first.validation)


def test_holdout_keeps_every_class_in_both_parts():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 2)
    fit, held = holdout_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(15))
    assert set(labels[fit]) == set(labels[held]) == {0, 1, 2}


def test_test_classes_without_train_examples_are_one_line():
    x, y = blobs(100)
    with pytest.raises(UnicomError, match=r"test classes \['unseen'\] have no train example"):
        linear_probe(x, y, x[:1], ["unseen"], CS)


def test_the_stage_probes_the_base_encoder_and_joins_the_summary(tmp_path, small_image_folder):
    """The probe CLI on the synthetic 4-category folder: train on 8 images per category (the
    URL-list layout of the demo pool), test on the other 4; the summary gets a probe row."""
    import json

    import pyarrow as pa

    from unicom.evaluate.summary import summary_rows, to_csv
    from unicom.io import write_parquet
    from unicom.supervised.linear_probe import main

    paths = sorted(small_image_folder.rglob("*.png"))
    rows = [(p, p.parent.name, int(p.stem.rsplit("_", 1)[1]) < 8) for p in paths]
    train = pa.table(
        {"url": [p.as_uri() for p, _, t in rows if t], "category": [c for _, c, t in rows if t]}
    )
    test = pa.table(
        {
            "path": [str(p) for p, _, t in rows if not t],
            "category": [c for _, c, t in rows if not t],
        }
    )
    write_parquet(tmp_path / "urls.parquet", train)
    write_parquet(tmp_path / "heldout.parquet", test)
    out = tmp_path / "probe.json"
    options = {"cs": [0.1, 10.0], "batch_size": 16, "num_workers": 0, "device": "cpu"}
    main(
        [
            "--model", "base", "--dataset", "openclipart",
            "--train-path", str(tmp_path / "urls.parquet"),
            "--test-path", str(tmp_path / "heldout.parquet"),
            "--out", str(out), "--options-json", json.dumps(options),
            "--embed-options-json", json.dumps({"encoder": "demo", "demo": {"image_size": 64}}),
        ]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["protocol"] == "linear probe" and result["model"] == "base"
    assert result["train_items"] == 32 and result["test_items"] == 16 and result["classes"] == 4
    assert result["top1"] > 0.9 and result["chance"] == 0.25
    (row,) = summary_rows([result])
    assert (row["protocol"], row["dim"], row["top1"]) == ("linear probe", 1280, result["top1"])
    assert to_csv([row]).splitlines()[1].startswith("linear probe,base,openclipart,1280,,")


def test_an_image_folder_is_probed_too(tmp_path, small_image_folder):
    """Any ImageFolder-layout dataset (CIFAR, Food-101, ... as files): train/ and test/."""
    import json

    from unicom.supervised.linear_probe import main

    for path in sorted(small_image_folder.rglob("*.png")):
        split = "train" if int(path.stem.rsplit("_", 1)[1]) < 8 else "test"
        target = tmp_path / "folder" / split / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    out = tmp_path / "probe.json"
    folder = str(tmp_path / "folder")
    main(
        [
            "--model", "base", "--dataset", "shapes", "--image-folder",
            "--train-path", folder, "--test-path", folder, "--out", str(out),
            "--options-json", json.dumps({"cs": [1.0], "batch_size": 16, "num_workers": 0}),
            "--embed-options-json", json.dumps({"encoder": "demo", "demo": {"image_size": 64}}),
        ]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["dataset"]["name"] == "shapes" and result["classes"] == 4
    assert (result["train_items"], result["test_items"]) == (32, 16) and result["top1"] > 0.9
