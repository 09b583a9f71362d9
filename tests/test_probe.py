"""The linear probe (CLIP's protocol) on separable and on shuffled labels."""

from __future__ import annotations

import numpy as np
import pytest

from unicom.errors import UnicomError
from unicom.evaluate.probe import choose_c, holdout_split, linear_probe

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
