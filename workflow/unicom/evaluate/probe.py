"""Linear probe on frozen embeddings: CLIP's protocol (Radford et al. 2021, Sec. 3.2 and A.3).

A multinomial logistic regression (scikit-learn, L-BFGS) on the train split's embeddings; its
inverse regularisation ``C`` is chosen on a held-out, stratified part of the train split by a
sweep over ``Cs`` (accuracy on the held-out part, the smaller C on a tie); the chosen C is refit
on the whole train split and scored once on the test split (top-1 accuracy). The test split's
labels reach nothing but that final score: ``choose_c`` never sees them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unicom.errors import UnicomError

log = logging.getLogger("unicom.evaluate.probe")


@dataclass(frozen=True)
class ProbeResult:
    c: float
    validation: dict[str, float]  # C (as text) -> held-out accuracy
    top1: float
    chance: float  # 1 / classes
    majority: float  # the most frequent test class's share
    classes: int
    train_items: int
    test_items: int

    def summary(self) -> dict[str, Any]:
        return {
            "C": self.c,
            "validation_accuracy": self.validation,
            "top1": self.top1,
            "chance": self.chance,
            "majority": self.majority,
            "classes": self.classes,
            "train_items": self.train_items,
            "test_items": self.test_items,
        }


def _classifier(c: float, max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed)


def _fit(classifier, x: np.ndarray, y: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # A sweep visits weakly regularised Cs that stop at max_iter; their held-out score
        # says what they are worth, the warning adds nothing.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return classifier.fit(x, y)


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: ``fraction`` of every class held out (at least one item of a
    class with two or more), seeded."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(members[:count])
        fit.append(members[count:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def choose_c(
    x: np.ndarray,
    y: np.ndarray,
    cs: Sequence[float],
    holdout_fraction: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
) -> tuple[float, dict[str, float]]:
    """The C of ``cs`` with the best accuracy on a held-out part of the TRAIN split."""
    fit, held = holdout_split(y, holdout_fraction, seed)
    scores = {}
    for c in sorted(cs):
        classifier = _fit(_classifier(c, max_iter, seed), x[fit], y[fit])
        scores[f"{c:g}"] = float((classifier.predict(x[held]) == y[held]).mean())
    best = max(sorted(cs), key=lambda c: scores[f"{c:g}"])  # max keeps the first (smallest) tie
    return best, scores


def linear_probe(
    train_x: np.ndarray,
    train_y: Sequence[str],
    test_x: np.ndarray,
    test_y: Sequence[str],
    cs: Sequence[float],
    holdout_fraction: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
) -> ProbeResult:
    """Choose C on the train split, refit on all of it, top-1 accuracy on the test split."""
    classes = sorted(set(train_y))
    if len(classes) < 2:
        raise UnicomError(f"a linear probe needs at least 2 train classes, got {len(classes)}")
    unknown = sorted(set(test_y) - set(classes))
    if unknown:
        raise UnicomError(
            f"test classes {unknown[:5]} have no train example: a linear probe needs the same classes"
        )
    index = {label: i for i, label in enumerate(classes)}
    y_train = np.array([index[label] for label in train_y])
    y_test = np.array([index[label] for label in test_y])
    c, validation = choose_c(train_x, y_train, cs, holdout_fraction, max_iter, seed)
    classifier = _fit(_classifier(c, max_iter, seed), train_x, y_train)
    top1 = float((classifier.predict(test_x) == y_test).mean())
    majority = float(np.bincount(y_test, minlength=len(classes)).max() / len(y_test))
    log.info("linear probe: C %g (held-out %.4f), test top-1 %.4f", c, validation[f"{c:g}"], top1)
    return ProbeResult(
        c, validation, top1, 1 / len(classes), majority, len(classes), len(train_y), len(test_y)
    )
