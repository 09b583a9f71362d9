"""PartialFC against a plain single-process ArcFace, alone and on 2 real gloo ranks."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from unicom.errors import UnicomError
from unicom.train.partial_fc import (
    DRAW_SHARE_LIMIT,
    INIT_BLOCK,
    PartialFC,
    class_range,
    draw_distinct,
    init_prototypes,
)

from conftest import head_steps, join_gloo, spawn_ranks

NUM_CLASSES, DIM, SEED = 37, 12, 3  # 37 classes split 19 + 18 over two ranks
RANK_ROWS = [slice(0, 5), slice(5, 8)]  # unequal local batches: 5 + 3
# Few positives per rank, so negatives really are sampled: rank 0 {1, 3, 7}, rank 1 {20, 30, 36}.
LABELS = torch.tensor([3, 3, 20, 7, 30, 20, 1, 36])
STEPS = 3


def global_batch() -> torch.Tensor:
    return torch.randn(len(LABELS), DIM, generator=torch.Generator().manual_seed(1)).double()


def full_weight() -> torch.Tensor:
    return init_prototypes(DIM, 0, NUM_CLASSES, SEED).double()


def arcface_reference(embeddings, weight, labels, classes=None, dims=None, margin=0.3, scale=64.0):
    """ArcFace cross-entropy written plainly; ``classes``/``dims`` restrict it to a subset."""
    if classes is not None:
        weight, labels = weight[classes], torch.searchsorted(classes, labels)
    if dims is not None:
        embeddings, weight = embeddings[:, dims], weight[:, dims]
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T
    theta = torch.acos(cos.gather(1, labels[:, None]))
    logits = cos.scatter(1, labels[:, None], torch.cos(theta + margin)) * scale
    return F.cross_entropy(logits, labels)


def reference_with_grads(classes=None, dims=None):
    embeddings = global_batch().requires_grad_(True)
    weight = full_weight().requires_grad_(True)
    loss = arcface_reference(embeddings, weight, LABELS, classes, dims)
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
    for name, sample_rate, feature_rate in (("full", 1.0, 1.0), ("sampled", 0.25, 0.5)):
        head = PartialFC(
            NUM_CLASSES, DIM, sample_rate=sample_rate, feature_rate=feature_rate, seed=SEED
        ).double()
        results[name] = run_steps(head, rows)
        results[name + "_range"] = (head.start, head.end)
    bad_labels = LABELS[rows].clone()
    if rank == 1:  # only one rank sees the bad label; both must fail, neither may hang
        bad_labels[0] = NUM_CLASSES
    try:
        PartialFC(NUM_CLASSES, DIM, seed=SEED)(global_batch()[rows].float(), bad_labels)
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


def test_two_ranks_full_softmax_equal_plain_arcface(ranks):
    ref_loss, ref_embedding_grad, ref_weight_grad = reference_with_grads()
    assert [r["full_range"] for r in ranks] == [(0, 19), (19, 37)]
    for step in range(STEPS):
        for r in ranks:
            assert_close(r["full"][step]["loss"], ref_loss)  # every rank holds the global loss
        assert_close(
            torch.cat([r["full"][step]["embedding_grad"] for r in ranks]), ref_embedding_grad
        )
        assert_close(torch.cat([r["full"][step]["weight_grad"] for r in ranks]), ref_weight_grad)


def test_two_ranks_sampled_equal_plain_arcface_on_what_was_selected(ranks):
    dims_seen = set()
    for step in range(STEPS):
        steps = [r["sampled"][step] for r in ranks]
        classes = torch.cat([s["classes"] for s in steps])
        dims = steps[0]["dims"]
        dims_seen.add(tuple(dims.tolist()))
        ref_loss, ref_embedding_grad, ref_weight_grad = reference_with_grads(classes, dims)
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


def test_two_ranks_use_the_same_feature_dims(ranks):
    for step in range(STEPS):
        dims = [r["sampled"][step]["dims"] for r in ranks]
        assert torch.equal(dims[0], dims[1])
        assert len(dims[0]) == round(0.5 * DIM) and len(set(dims[0].tolist())) == len(dims[0])


def test_two_ranks_both_refuse_a_label_seen_by_one(ranks):
    for r in ranks:
        assert r["error"] == f"PartialFC label {NUM_CLASSES} is outside [0, {NUM_CLASSES})"


# --- one process, no process group ----------------------------------------------------------------


def test_world_one_without_process_group_equals_plain_arcface():
    assert not dist.is_initialized()
    head = PartialFC(NUM_CLASSES, DIM, sample_rate=1.0, feature_rate=1.0, seed=SEED).double()
    (step, *_) = run_steps(head)
    ref_loss, ref_embedding_grad, ref_weight_grad = reference_with_grads()
    assert_close(step["loss"], ref_loss)
    assert_close(step["embedding_grad"], ref_embedding_grad)
    assert_close(step["weight_grad"], ref_weight_grad)


def test_sparse_gradient_equals_dense_and_skips_unselected_rows():
    kwargs = dict(sample_rate=0.3, feature_rate=0.5, seed=SEED)
    dense = run_steps(PartialFC(NUM_CLASSES, DIM, **kwargs).double())
    sparse_head = PartialFC(NUM_CLASSES, DIM, sparse_grad=True, **kwargs).double()
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
    head = PartialFC(NUM_CLASSES, DIM, sample_rate=0.05, feature_rate=1.0)  # 2 sampled classes
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

    original = PartialFC(NUM_CLASSES, DIM, sample_rate=0.3, seed=SEED)
    draws(original, 1)
    torch.save(original.state_dict(), tmp_path / "head.pt")
    expected = draws(original)
    resumed = PartialFC(NUM_CLASSES, DIM, sample_rate=0.3, seed=SEED + 1)
    other_seed = draws(resumed)
    resumed.load_state_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    for (c0, d0, l0), (c1, d1, l1) in zip(expected, draws(resumed), strict=True):
        assert torch.equal(c0, c1) and torch.equal(d0, d1) and torch.equal(l0, l1)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(expected, other_seed, strict=True))


def test_checkpoint_of_another_class_range_is_refused():
    state = PartialFC(NUM_CLASSES, DIM).state_dict()
    state["_extra_state"]["class_range"] = [0, 19]
    with pytest.raises(UnicomError, match=r"holds classes \[0, 19\]"):
        PartialFC(NUM_CLASSES, DIM).load_state_dict(state)


def test_out_of_range_labels_are_one_line_errors():
    head = PartialFC(NUM_CLASSES, DIM)
    for bad in (-1, NUM_CLASSES):
        with pytest.raises(UnicomError, match=f"label {bad} is outside") as err:
            head(torch.randn(2, DIM), torch.tensor([0, bad]))
        assert "\n" not in str(err.value)
    with pytest.raises(UnicomError, match="expects embeddings"):
        head(torch.randn(2, DIM + 1), torch.tensor([0, 1]))
    with pytest.raises(UnicomError, match="sample_rate must be in"):
        PartialFC(NUM_CLASSES, DIM, sample_rate=0.0)


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
