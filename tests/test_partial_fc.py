"""PartialFC against a plain single-process ArcFace, alone and on 2 real gloo ranks, with the
margin's exact gradient and the authors' form (the margin under no_grad)."""

from __future__ import annotations

import doctest
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from unicom.errors import UnicomError
from unicom.train import partial_fc
from unicom.train.losses import ArcFaceLoss
from unicom.train.partial_fc import (
    DRAW_SHARE_LIMIT,
    INIT_BLOCK,
    PartialFC,
    class_range,
    draw_distinct,
    init_prototypes,
)

from helpers.ranks import head_steps, join_gloo, spawn_ranks

NUM_CLASSES, DIM, SEED = 37, 12, 3  # 37 classes split 19 + 18 over two ranks
RANK_ROWS = [slice(0, 5), slice(5, 8)]  # unequal local batches: 5 + 3
# Few positives per rank, so negatives really are sampled: rank 0 {1, 3, 7}, rank 1 {20, 30, 36}.
LABELS = torch.tensor([3, 3, 20, 7, 30, 20, 1, 36])
STEPS = 3
ARCFACE = ArcFaceLoss(margin=0.3, scale=64.0)


def global_batch() -> torch.Tensor:
    return torch.randn(len(LABELS), DIM, generator=torch.Generator().manual_seed(1)).double()


def full_weight() -> torch.Tensor:
    return init_prototypes(DIM, 0, NUM_CLASSES, SEED).double()


def arcface_reference(embeddings, weight, labels, classes=None, dims=None, gradient="exact"):
    """ArcFace cross-entropy (margin 0.3, scale 64) written plainly; ``classes``/``dims``
    restrict it to a subset. ``gradient="authors"``: the margin term detached, as their code's
    ``no_grad`` makes it."""
    if classes is not None:
        weight, labels = weight[classes], torch.searchsorted(classes, labels)
    if dims is not None:
        embeddings, weight = embeddings[:, dims], weight[:, dims]
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T
    label_cos = cos.gather(1, labels[:, None])
    margin_cos = torch.cos(torch.acos(label_cos) + 0.3)
    if gradient == "authors":
        margin_cos = label_cos + (margin_cos - label_cos).detach()
    logits = cos.scatter(1, labels[:, None], margin_cos) * 64.0
    return F.cross_entropy(logits, labels)


def reference_with_grads(classes=None, dims=None, gradient="exact"):
    embeddings = global_batch().requires_grad_(True)
    weight = full_weight().requires_grad_(True)
    loss = arcface_reference(embeddings, weight, LABELS, classes, dims, gradient)
    loss.backward()
    return loss.detach(), embeddings.grad, weight.grad


def run_steps(head: PartialFC, rows=slice(None)) -> list[dict]:
    """STEPS passes on the batch rows ``rows``; what happened in each."""
    return head_steps(head, lambda: global_batch()[rows], LABELS[rows], STEPS)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --- two real ranks ------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    join_gloo(rank, world, port)
    rows = RANK_ROWS[rank]
    results = {}
    for gradient, suffix in (("exact", ""), ("authors", "_authors")):
        loss = ArcFaceLoss(0.3, 64.0, gradient)
        for name, sample_rate, feature_rate in (("full", 1.0, 1.0), ("sampled", 0.25, 0.5)):
            head = PartialFC(
                loss,
                NUM_CLASSES,
                DIM,
                sample_rate=sample_rate,
                feature_rate=feature_rate,
                seed=SEED,
            ).double()
            results[name + suffix] = run_steps(head, rows)
            results[name + "_range"] = (head.start, head.end)
    bad_labels = LABELS[rows].clone()
    if rank == 1:  # only one rank sees the bad label; both must fail, neither may hang
        bad_labels[0] = NUM_CLASSES
    try:
        PartialFC(ARCFACE, NUM_CLASSES, DIM, seed=SEED)(global_batch()[rows].float(), bad_labels)
        results["error"] = None
    except UnicomError as err:
        results["error"] = str(err)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Results of ``_worker`` on each of 2 gloo ranks."""
    out_dir = tmp_path_factory.mktemp("partial_fc")
    spawn_ranks(_worker, 2, out_dir, "distributed PartialFC workers")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


FORMS = [("exact", ""), ("authors", "_authors")]


@pytest.mark.parametrize(("gradient", "suffix"), FORMS)
def test_two_ranks_full_softmax_equal_plain_arcface(ranks, gradient, suffix):
    ref_loss, ref_embedding_grad, ref_weight_grad = reference_with_grads(gradient=gradient)
    assert [r["full_range"] for r in ranks] == [(0, 19), (19, 37)]
    for step in range(STEPS):
        for r in ranks:
            assert_close(r["full" + suffix][step]["loss"], ref_loss)  # the global loss
        embedding_grad = torch.cat([r["full" + suffix][step]["embedding_grad"] for r in ranks])
        assert_close(embedding_grad, ref_embedding_grad)
        weight_grad = torch.cat([r["full" + suffix][step]["weight_grad"] for r in ranks])
        assert_close(weight_grad, ref_weight_grad)


@pytest.mark.parametrize(("gradient", "suffix"), FORMS)
def test_two_ranks_sampled_equal_plain_arcface_on_what_was_selected(ranks, gradient, suffix):
    dims_seen = set()
    for step in range(STEPS):
        steps = [r["sampled" + suffix][step] for r in ranks]
        classes = torch.cat([s["classes"] for s in steps])
        dims = steps[0]["dims"]
        dims_seen.add(tuple(dims.tolist()))
        ref_loss, ref_embedding_grad, ref_weight_grad = reference_with_grads(
            classes, dims, gradient
        )
        weight_grad = torch.cat([s["weight_grad"] for s in steps])
        for s in steps:
            assert_close(s["loss"], ref_loss)
        assert_close(torch.cat([s["embedding_grad"] for s in steps]), ref_embedding_grad)
        assert_close(weight_grad, ref_weight_grad)

        for r, s in zip(ranks, steps, strict=True):
            start, end = r["sampled_range"]
            positives = {int(y) for y in LABELS if start <= y < end}
            selected = set(s["classes"].tolist())
            assert positives <= selected and selected <= set(range(start, end))
            assert (
                len(selected) == max(round(0.25 * (end - start)), len(positives)) > len(positives)
            )
        unselected = torch.ones(NUM_CLASSES, dtype=torch.bool)
        unselected[classes] = False
        assert torch.all(weight_grad[unselected] == 0)
        assert torch.all(weight_grad[classes].abs().sum(dim=1) > 0)
    assert len(dims_seen) > 1  # a fresh draw each step


def test_two_ranks_the_two_forms_differ_in_the_gradient_only(ranks):
    """Same draws, same loss; the embeddings' gradients differ (the margin's slope)."""
    for r in ranks:
        for exact, authors in zip(r["sampled"], r["sampled_authors"], strict=True):
            assert torch.equal(exact["classes"], authors["classes"])
            assert torch.equal(exact["dims"], authors["dims"])
            assert_close(authors["loss"], exact["loss"])
            gap = (authors["embedding_grad"] - exact["embedding_grad"]).abs().max()
            assert gap > 1e-3 * exact["embedding_grad"].abs().max()


def test_two_ranks_use_the_same_feature_dims(ranks):
    for step in range(STEPS):
        dims = [r["sampled"][step]["dims"] for r in ranks]
        assert torch.equal(dims[0], dims[1])
        assert len(dims[0]) == round(0.5 * DIM) and len(set(dims[0].tolist())) == len(dims[0])


def test_two_ranks_both_refuse_a_label_seen_by_one(ranks):
    for r in ranks:
        assert r["error"] == f"PartialFC label {NUM_CLASSES} is outside [0, {NUM_CLASSES})"


# --- one process, no process group ----------------------------------------------------------------


@pytest.mark.parametrize("gradient", ["exact", "authors"])
def test_world_one_without_process_group_equals_plain_arcface(gradient):
    assert not dist.is_initialized()
    loss = ArcFaceLoss(0.3, 64.0, gradient)
    for sample_rate, feature_rate in ((1.0, 1.0), (0.3, 0.5)):
        head = PartialFC(
            loss, NUM_CLASSES, DIM, sample_rate=sample_rate, feature_rate=feature_rate, seed=SEED
        ).double()
        for step in run_steps(head):
            ref_loss, ref_embedding_grad, ref_weight_grad = reference_with_grads(
                step["classes"] if sample_rate < 1 else None, step["dims"], gradient
            )
            assert_close(step["loss"], ref_loss)
            assert_close(step["embedding_grad"], ref_embedding_grad)
            assert_close(step["weight_grad"], ref_weight_grad)


def test_the_label_cosines_gradient_in_both_forms():
    """One row, the label's cosine 1/3 among negatives at 0.9 (its softmax share e^-55): the
    label's cosine gets -s * (cos m + sin m * cot theta) = -64 x 1.0598 = -67.83 exactly, and
    the plain logit's -s = -64.0 in the authors' form; the negatives' gradients and the loss
    are the same in both."""
    cos = torch.tensor([[1 / 3, 0.9, 0.9, 0.9]], dtype=torch.float64)
    grads = {}
    for gradient in ("exact", "authors"):
        leaf = cos.clone().requires_grad_(True)
        loss = ArcFaceLoss(0.3, 64.0, gradient)(leaf, torch.tensor([0]), torch.tensor([0]), False)
        loss.backward()
        grads[gradient] = (loss.item(), leaf.grad[0])
        assert loss.item() == pytest.approx(56.1497244, rel=1e-9)
    assert grads["exact"][1][0].item() == pytest.approx(-67.8283943, rel=1e-9)
    assert grads["authors"][1][0].item() == pytest.approx(-64.0, rel=1e-12)
    assert torch.equal(grads["exact"][1][1:], grads["authors"][1][1:])


def test_docstring_example_runs():
    """PartialFC's usage example (ArcFace and MLCD heads, select, a step) as written."""
    torch.manual_seed(0)
    finder, runner = (
        doctest.DocTestFinder(recurse=False),
        doctest.DocTestRunner(optionflags=doctest.ELLIPSIS),
    )
    (example,) = finder.find(partial_fc.PartialFC, "PartialFC", globs=dict(vars(partial_fc)))
    assert len(example.examples) >= 10
    assert runner.run(example).failed == 0


def test_the_loss_is_chosen_explicitly_and_checked():
    with pytest.raises(UnicomError, match=r"one label a row, got labels \(6, 2\)"):
        PartialFC(ARCFACE, NUM_CLASSES, DIM)(
            torch.randn(6, DIM), torch.zeros(6, 2, dtype=torch.long)
        )
    with pytest.raises(UnicomError, match="margin_gradient must be one of exact, authors"):
        ArcFaceLoss(margin_gradient="no_grad")
    with pytest.raises(UnicomError, match="loss must be an ArcFaceLoss or MLCDLoss"):
        PartialFC(ArcFaceLoss, NUM_CLASSES, DIM)  # the class, not a loss
    assert "ArcFaceLoss(margin=0.3, scale=64.0, margin_gradient='exact')" in repr(
        PartialFC(ARCFACE, NUM_CLASSES, DIM)
    )


def test_sparse_gradient_equals_dense_and_skips_unselected_rows():
    kwargs = dict(sample_rate=0.3, feature_rate=0.5, seed=SEED)
    dense = run_steps(PartialFC(ARCFACE, NUM_CLASSES, DIM, **kwargs).double())
    sparse_head = PartialFC(ARCFACE, NUM_CLASSES, DIM, sparse_grad=True, **kwargs).double()
    sparse = run_steps(sparse_head)
    assert sparse_head.weight.grad.is_sparse
    for d, s in zip(dense, sparse, strict=True):
        assert torch.equal(d["classes"], s["classes"]) and torch.equal(d["dims"], s["dims"])
        assert_close(s["loss"], d["loss"])
        assert_close(s["weight_grad"], d["weight_grad"])
        ref_loss, _, ref_weight_grad = reference_with_grads(s["classes"], s["dims"])
        assert_close(s["loss"], ref_loss)
        assert_close(s["weight_grad"], ref_weight_grad)
        assert len(s["classes"]) == round(0.3 * NUM_CLASSES)


def test_all_positives_kept_when_they_outnumber_the_sample():
    head = PartialFC(
        ARCFACE, NUM_CLASSES, DIM, sample_rate=0.05, feature_rate=1.0
    )  # 2 sampled classes
    labels = torch.tensor([0, 5, 5, 9, 20, 36])
    head(torch.randn(len(labels), DIM), labels)
    assert head.last_selected_classes.tolist() == [0, 5, 9, 20, 36]


@pytest.mark.parametrize("count", [3, 5, 13])  # by draws (3, 5 <= 0.3 x 18) and by permutation
def test_drawn_classes_are_distinct_uniform_and_never_excluded(count):
    assert (count <= DRAW_SHARE_LIMIT * 18) == (count < 13)
    generator, excluded, trials = torch.Generator().manual_seed(0), torch.tensor([3, 7]), 20_000
    frequency = torch.zeros(20)
    for _ in range(trials):
        drawn = draw_distinct(20, excluded, count, generator)
        assert len(drawn) == count and len(drawn.unique()) == count
        frequency[drawn] += 1 / trials
    assert frequency[excluded].tolist() == [0.0, 0.0]
    free = torch.ones(20, dtype=torch.bool)
    free[excluded] = False
    # Each of the 18 free classes in count/18 of the draws; 6 binomial SDs at most.
    tolerance = 6 * (count / 18 * (1 - count / 18) / trials) ** 0.5
    assert (frequency[free] - count / 18).abs().max() <= tolerance


def test_draws_keep_pairs_as_often_as_sampling_without_replacement():
    """Not only each class: each pair of classes is as likely as any other (exact, not marginal)."""
    generator, trials = torch.Generator().manual_seed(1), 30_000
    pairs = torch.zeros(10, 10)
    for _ in range(trials):
        a, b = draw_distinct(10, torch.tensor([], dtype=torch.long), 2, generator).tolist()
        pairs[min(a, b), max(a, b)] += 1 / trials
    upper = pairs[torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)]
    tolerance = 6 * (1 / 45 * (44 / 45) / trials) ** 0.5
    assert (upper - 1 / 45).abs().max() <= tolerance


def test_asking_for_more_than_is_free_gives_everything_free():
    drawn = draw_distinct(6, torch.tensor([0, 4]), 10, torch.Generator().manual_seed(0))
    assert sorted(drawn.tolist()) == [1, 2, 3, 5]


def test_resumed_run_draws_the_same_samples(tmp_path):
    def draws(head, steps=3):
        out = []
        for _ in range(steps):
            loss = head(global_batch().float(), LABELS)
            out.append((head.last_selected_classes, head.last_selected_dims, loss.detach()))
        return out

    original = PartialFC(ARCFACE, NUM_CLASSES, DIM, sample_rate=0.3, seed=SEED)
    draws(original, 1)
    torch.save(original.state_dict(), tmp_path / "head.pt")
    expected = draws(original)
    resumed = PartialFC(ARCFACE, NUM_CLASSES, DIM, sample_rate=0.3, seed=SEED + 1)
    other_seed = draws(resumed)
    resumed.load_state_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    for (c0, d0, l0), (c1, d1, l1) in zip(expected, draws(resumed), strict=True):
        assert torch.equal(c0, c1) and torch.equal(d0, d1) and torch.equal(l0, l1)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(expected, other_seed, strict=True))


def test_checkpoint_of_another_class_range_is_refused():
    state = PartialFC(ARCFACE, NUM_CLASSES, DIM).state_dict()
    state["_extra_state"]["class_range"] = [0, 19]
    with pytest.raises(UnicomError, match=r"holds classes \[0, 19\]"):
        PartialFC(ARCFACE, NUM_CLASSES, DIM).load_state_dict(state)


def test_out_of_range_labels_are_one_line_errors():
    head = PartialFC(ARCFACE, NUM_CLASSES, DIM)
    for bad in (-1, NUM_CLASSES):
        with pytest.raises(UnicomError, match=f"label {bad} is outside") as err:
            head(torch.randn(2, DIM), torch.tensor([0, bad]))
        assert "\n" not in str(err.value)
    with pytest.raises(UnicomError, match="expects embeddings"):
        head(torch.randn(2, DIM + 1), torch.tensor([0, 1]))
    with pytest.raises(UnicomError, match="sample_rate must be in"):
        PartialFC(ARCFACE, NUM_CLASSES, DIM, sample_rate=0.0)


def test_class_ranges_tile_the_classes():
    for num_classes, world in ((37, 2), (10, 3), (8, 8), (1000, 7)):
        ranges = [class_range(num_classes, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        sizes = {end - start for start, end in ranges}
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(UnicomError, match="smaller than the world size"):
        class_range(3, 0, 4)


def test_prototype_init_does_not_depend_on_the_split():
    num_classes = 2 * INIT_BLOCK + 5
    whole = init_prototypes(4, 0, num_classes, seed=7)
    parts = [init_prototypes(4, *class_range(num_classes, r, 3), seed=7) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(init_prototypes(4, 0, num_classes, seed=8), whole)
    assert abs(whole.std().item() - 0.01) < 1e-3
