"""The multi-label (MLCD) head against a plain float64 autograd reference, alone and on 2 gloo
ranks, with the margin's exact gradient and the authors' form (the margin term detached)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from unicom.errors import UnicomError
from unicom.train.losses import ArcFaceLoss
from unicom.train.mlcd import MLCDLoss
from unicom.train.partial_fc import PartialFC
from unicom.train.train import train_options
from unicom.train.trainer import head_loss

from helpers.ranks import head_steps, join_gloo, spawn_ranks

NUM_CLASSES, DIM, SEED = 37, 12, 5  # 37 classes: 19 + 18 over two ranks
RANK_ROWS = [slice(0, 5), slice(5, 8)]
# 3 positives per row, some on each rank's range, some shared between rows.
LABELS = torch.tensor(
    [[3, 20, 7], [3, 1, 30], [20, 36, 2], [7, 3, 25], [30, 11, 19], [20, 3, 36], [1, 2, 18],
     [36, 25, 0]]
)  # fmt: skip
STEPS = 3
SAMPLE_RATE, FEATURE_RATE = 0.5, 0.5
GRADIENTS = ["exact", "authors"]


def global_batch() -> torch.Tensor:
    return torch.randn(len(LABELS), DIM, generator=torch.Generator().manual_seed(4)).double()


def mlcd_reference(embeddings, weight, labels, classes, dims, gradient, margin=0.3, scale=64.0):
    """L_i = log(1 + sum_neg exp(s cos)) + log(1 + sum_pos exp(-s cos(theta + m))), plainly;
    ``gradient="authors"``: the margin term ``cos(theta + m) - cos`` detached."""
    weight, positions = weight[classes], torch.searchsorted(classes, labels)
    cos = F.normalize(embeddings[:, dims], dim=1) @ F.normalize(weight[:, dims], dim=1).T
    is_positive = torch.zeros_like(cos, dtype=torch.bool).scatter(1, positions, True)
    losses = []
    for row in range(len(cos)):
        negatives = cos[row][~is_positive[row]]
        positives = cos[row][is_positive[row]]
        negative_term = torch.log(1 + torch.exp(scale * negatives).sum())
        margin_cos = torch.cos(torch.acos(positives) + margin)
        if gradient == "authors":
            margin_cos = positives + (margin_cos - positives).detach()
        positive_term = torch.log(1 + torch.exp(-scale * margin_cos).sum())
        losses.append(negative_term + positive_term)
    return torch.stack(losses).mean()


def run_steps(head: PartialFC, rows=slice(None)) -> list[dict]:
    """STEPS passes on the batch rows ``rows``; what happened in each."""
    return head_steps(head, lambda: global_batch()[rows], LABELS[rows], STEPS)


def reference_step(classes, dims, gradient):
    embeddings = global_batch().requires_grad_(True)
    weight = head_weight().requires_grad_(True)
    loss = mlcd_reference(embeddings, weight, LABELS, classes, dims, gradient)
    loss.backward()
    return loss.detach(), embeddings.grad, weight.grad


def head_weight() -> torch.Tensor:
    return PartialFC(MLCDLoss(), NUM_CLASSES, DIM, seed=SEED).double().weight.detach().clone()


def assert_relative(actual, expected, tolerance=1e-6):
    scale = expected.abs().max().clamp_min(1e-30)
    assert (actual - expected).abs().max() / scale <= tolerance


def check_against_reference(steps_of_ranks: list[list[dict]], rows_of_ranks, gradient) -> None:
    """Every step: the loss on each rank, the embeddings' gradients (each rank its rows) and the
    prototypes' gradients (each rank its class range) equal the reference's."""
    for step in range(STEPS):
        classes = torch.cat([steps[step]["classes"] for steps in steps_of_ranks])
        dims = steps_of_ranks[0][step]["dims"]
        assert len(dims) == round(FEATURE_RATE * DIM)
        assert set(LABELS.reshape(-1).tolist()) <= set(classes.tolist())  # all positives kept
        assert len(classes) < NUM_CLASSES  # and negatives really sampled
        loss, embedding_grad, weight_grad = reference_step(classes, dims, gradient)
        start = 0
        for steps, rows in zip(steps_of_ranks, rows_of_ranks, strict=True):
            got = steps[step]
            assert_relative(got["loss"], loss)
            assert_relative(got["embedding_grad"], embedding_grad[rows])
            end = start + len(got["weight_grad"])
            assert_relative(got["weight_grad"], weight_grad[start:end])
            start = end


def mlcd_head(gradient: str) -> PartialFC:
    loss = MLCDLoss(0.3, 64.0, gradient)
    head = PartialFC(
        loss, NUM_CLASSES, DIM, sample_rate=SAMPLE_RATE, feature_rate=FEATURE_RATE, seed=SEED
    )
    return head.double()


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_world_one_equals_the_plain_reference_with_sampled_classes_and_dims(gradient):
    check_against_reference([run_steps(mlcd_head(gradient))], [slice(None)], gradient)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    join_gloo(rank, world, port)
    steps = {gradient: run_steps(mlcd_head(gradient), RANK_ROWS[rank]) for gradient in GRADIENTS}
    torch.save(steps, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each of 2 gloo ranks' steps, per form of the margin's gradient."""
    out_dir = tmp_path_factory.mktemp("mlcd")
    spawn_ranks(_worker, 2, out_dir, "distributed MLCD workers")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_two_ranks_equal_the_plain_reference(ranks, gradient):
    check_against_reference([r[gradient] for r in ranks], RANK_ROWS, gradient)


def test_the_two_forms_differ_in_the_positives_gradient_only(ranks):
    for r in ranks:
        for exact, authors in zip(r["exact"], r["authors"], strict=True):
            assert torch.equal(exact["classes"], authors["classes"])
            assert_relative(authors["loss"], exact["loss"], 1e-12)
            gap = (authors["embedding_grad"] - exact["embedding_grad"]).abs().max()
            assert gap > 1e-3 * exact["embedding_grad"].abs().max()


def test_the_trainer_takes_arcface_for_one_positive_and_mlcd_for_more():
    assert head_loss(train_options({})) == ArcFaceLoss(0.3, 64.0, "exact")
    options = train_options({"positives": 3, "margin_gradient": "authors", "scale": 32.0})
    assert head_loss(options) == MLCDLoss(0.3, 32.0, "authors")
    with pytest.raises(UnicomError, match="config key train.margin_gradient"):
        train_options({"margin_gradient": "no_grad"})


def test_one_positive_is_the_arcface_head_bit_for_bit():
    """ArcFace takes labels (B, 1) as (B,): the same draws, identical losses and grads."""
    results = []
    for labels in (LABELS[:, 0], LABELS[:, :1]):
        head = PartialFC(
            ArcFaceLoss(), NUM_CLASSES, DIM, sample_rate=0.25, feature_rate=0.5, seed=SEED
        )
        embeddings = global_batch().float().requires_grad_(True)
        loss = head(embeddings, labels)
        loss.backward()
        results.append(
            (loss.detach(), embeddings.grad, head.weight.grad, head.last_selected_classes)
        )
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


def test_more_positives_learn_them_all():
    """SGD on free embeddings raises the cosine to every one of a row's positives above the
    zero threshold and above every negative's: no positive is sacrificed to another."""
    torch.manual_seed(0)
    head = PartialFC(MLCDLoss(), NUM_CLASSES, DIM, sample_rate=1.0, feature_rate=1.0, seed=SEED)
    embeddings = torch.randn(len(LABELS), DIM, requires_grad=True)
    optimizer = torch.optim.SGD([embeddings, head.weight], lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        head(embeddings, LABELS).backward()
        optimizer.step()
    cos = F.normalize(embeddings.detach(), dim=1) @ F.normalize(head.weight.detach(), dim=1).T
    is_positive = torch.zeros_like(cos, dtype=torch.bool).scatter(1, LABELS, True)
    assert cos[is_positive].min() > 0
    for row in range(len(cos)):  # each row ranks all its positives above all its negatives
        assert cos[row][is_positive[row]].min() > cos[row][~is_positive[row]].max()
