"""Linear probe on frozen embeddings: CLIP's protocol (Radford et al. 2021, Sec. 3.2 and A.3).

A multinomial logistic regression (scikit-learn, L-BFGS) on the train split's embeddings; its
inverse regularisation ``C`` is chosen on a held-out, stratified part of the train split by a
sweep over ``Cs`` (accuracy on the held-out part, the smaller C on a tie); the chosen C is refit
on the whole train split and scored once on the test split (top-1 accuracy). The test split's
labels reach nothing but that final score: ``choose_c`` never sees them.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unicom import formats
from unicom.cli import add_model_arguments, parse_options_json, run_cli, setup_logging
from unicom.errors import UnicomError
from unicom.io import write_json
from unicom.options import StageOptions

log = logging.getLogger("unicom.supervised.linear_probe")
OPTIONS = StageOptions("linear_probe")


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


# ----------------------------------------------------------------------------- the stage


def probe_stage(
    model: str,
    dataset: str,
    train_path: str,
    test_path: str,
    options: Mapping[str, Any],
    embed_options: Mapping[str, Any],
    image_folder: bool = False,
) -> dict[str, Any]:
    """Embed a subset of the train and test splits with ``model`` (frozen), fit the probe.
    ``image_folder``: ``dataset`` names a folder in ImageFolder layout, not a benchmark."""
    from unicom import benchmarks
    from unicom.benchmarks.sets import cap_set
    from unicom.devices import resolve_device
    from unicom.embedders import embed_items, load_embedder

    device = resolve_device(options["device"], "linear_probe.device")
    embedder = load_embedder(model, dict(embed_options), device)
    splits = {}
    for split, path, limit in (
        ("train", train_path, options["max_train"]),
        ("test", test_path, options["max_test"]),
    ):
        loaded = benchmarks.load(dataset, path, split=split, image_folder=image_folder)
        capped = cap_set(loaded, limit, options["seed"])
        items, labels = capped.items, capped.labels
        start = time.perf_counter()
        embeddings = embed_items(embedder, items, options["batch_size"], options["num_workers"])
        splits[split] = (embeddings, labels, loaded.summary(), time.perf_counter() - start)
    (train_x, train_y, train_info, train_s), (test_x, test_y, test_info, test_s) = (
        splits["train"],
        splits["test"],
    )
    result = linear_probe(
        train_x, train_y, test_x, test_y, options["cs"], options["holdout_fraction"],
        options["max_iter"], options["seed"],
    )  # fmt: skip
    return {
        "protocol": formats.LINEAR_PROBE,
        "model": embedder.name if model == "base" else model_name(model),
        "model_identity": embedder.identity,
        "dataset": {"name": dataset, "train": train_info, "test": test_info},
        "embedding_dim": int(train_x.shape[1]),
        "embed_seconds": round(train_s + test_s, 2),
        **result.summary(),
    }


def model_name(model_dir: str) -> str:
    """How the summary names a trained export: its folder's name (``train`` -> trained)."""
    name = Path(model_dir).name
    return "trained" if name == "train" else name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unicom.supervised.linear_probe", description=__doc__
    )
    add_model_arguments(parser)
    parser.add_argument("--dataset", required=True, help="benchmark name (unicom.benchmarks)")
    parser.add_argument("--train-path", required=True, help="where its train split is")
    parser.add_argument("--test-path", required=True, help="where its test split is")
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument(
        "--image-folder",
        action="store_true",
        help="--dataset names a folder in ImageFolder layout (ROOT/{train,test}/<class>/)",
    )
    OPTIONS.add_to(parser)
    args = parser.parse_args(argv)
    options = OPTIONS.from_args(args)
    setup_logging()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = probe_stage(
        args.model,
        args.dataset,
        args.train_path,
        args.test_path,
        options,
        parse_options_json(args.embed_options_json),
        args.image_folder,
    )
    write_json(args.out, result)
    log.info(
        "%s on %s: linear probe top-1 %.4f (C %g, chance %.3f)",
        result["model"], args.dataset, result["top1"], result["C"], result["chance"],
    )  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
