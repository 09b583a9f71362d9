"""Retrieval metrics: hand-worked examples, agreement with pytorch-metric-learning, edge cases."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from unicom.errors import UnicomError
from unicom.evaluate.metrics import (
    ExactSearch,
    evaluate_dims,
    main,
    nearest_neighbours,
    retrieval_metrics,
    truncate,
)
from unicom.formats import embedding_array
from unicom.io import write_parquet


def on_circle(degrees: list[float]) -> np.ndarray:
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


# Six points on the unit circle; cosine similarity ranks by angular distance.
#   index:  0   1   2   3   4    5
#   angle:  0  10  25  40  180  200
#   label:  A   A   B   A   B    B
CIRCLE = on_circle([0, 10, 25, 40, 180, 200])
CIRCLE_LABELS = list("AABABB")


def test_single_set_hand_worked():
    # Every class has 3 members, so R = 2 for every query. Ranking of the others by angle:
    #   q0 (A): 1(A) 2(B) 3(A) 5 4   R@1=1 R@2=1 RP=1/2 AP@R=(1/1)/2         = 1/2
    #   q1 (A): 0(A) 2(B) 3(A) 4 5   R@1=1 R@2=1 RP=1/2 AP@R=(1/1)/2         = 1/2
    #   q2 (B): 1(A) 3(A) 0(A) 4(B)  R@1=0 R@2=0 R@4=1  RP=0   AP@R=0
    #   q3 (A): 2(B) 1(A) 0(A) 4 5   R@1=0 R@2=1 RP=1/2 AP@R=(1/2)/2         = 1/4
    #   q4 (B): 5(B) 3(A) 2(B) 1 0   R@1=1 R@2=1 RP=1/2 AP@R=(1/1)/2         = 1/2
    #   q5 (B): 4(B) 0(A) 3(A) 1 2   R@1=1 R@2=1 RP=1/2 AP@R=(1/1)/2         = 1/2
    result = retrieval_metrics(CIRCLE, CIRCLE_LABELS)
    assert result["recall@1"] == pytest.approx(4 / 6)
    assert result["recall@2"] == pytest.approx(5 / 6)
    assert result["recall@4"] == pytest.approx(1.0)
    assert result["recall@8"] == pytest.approx(1.0)
    assert result["r_precision"] == pytest.approx(2.5 / 6)
    assert result["map@r"] == pytest.approx(2.25 / 6)
    assert result["protocol"] == "single"
    assert result["queries"] == result["gallery"] == result["queries_evaluated"] == 6
    assert result["queries_without_positives"] == 0
    assert result["neighbours"] == 8 - 3  # max K = 8, capped at the 5 other samples


def test_query_gallery_hand_worked():
    # Gallery = the six circle points. Queries:
    #   a at 5 deg (A, R=3 {0,1,3}): 0(A) 1(A) 2(B) 3(A)  R@1=1 R@2=1 RP=2/3 AP@R=(1+1)/3 = 2/3
    #   b at 100 deg (B, R=3 {2,4,5}): 3(A,60) 2(B,75) 4(B,80) 1(A,90)
    #                                R@1=0 R@2=1 RP=2/3 AP@R=(1/2 + 2/3)/3 = 7/18
    #   c at 270 deg (C): no C in the gallery -> R=0, excluded
    queries = on_circle([5, 100, 270])
    result = retrieval_metrics(queries, list("ABC"), CIRCLE, CIRCLE_LABELS, ks=(1, 2))
    assert result["recall@1"] == pytest.approx(1 / 2)
    assert result["recall@2"] == pytest.approx(1.0)
    assert result["r_precision"] == pytest.approx(2 / 3)
    assert result["map@r"] == pytest.approx((2 / 3 + 7 / 18) / 2)
    assert "recall@4" not in result
    assert result["protocol"] == "query_gallery"
    assert (result["queries"], result["gallery"]) == (3, 6)
    assert result["queries_evaluated"] == 2
    assert result["queries_without_positives"] == 1


class CalculatorWithRecall(AccuracyCalculator):
    """pytorch-metric-learning's calculator plus Recall@K on its own neighbour lists."""

    def requires_knn(self):
        return super().requires_knn() + ["recall_at_2", "recall_at_4", "recall_at_8"]

    def _recall(self, knn_labels, query_labels, not_lone_query_mask, k):
        knn = knn_labels[not_lone_query_mask][:, :k]
        hits = (knn == query_labels[not_lone_query_mask][:, None]).any(dim=1)
        return hits.double().mean().item()

    def calculate_recall_at_2(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        return self._recall(knn_labels, query_labels, not_lone_query_mask, 2)

    def calculate_recall_at_4(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        return self._recall(knn_labels, query_labels, not_lone_query_mask, 4)

    def calculate_recall_at_8(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        return self._recall(knn_labels, query_labels, not_lone_query_mask, 8)


PML_NAMES = {
    "recall@1": "precision_at_1",
    "recall@2": "recall_at_2",
    "recall@4": "recall_at_4",
    "recall@8": "recall_at_8",
    "map@r": "mean_average_precision_at_r",
    "r_precision": "r_precision",
}


def clustered(rng: np.random.Generator, labels: np.ndarray, dim: int, noise: float) -> np.ndarray:
    centres = rng.normal(size=(labels.max() + 1, dim))
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def pml_metrics(query, query_labels, reference=None, reference_labels=None) -> dict:
    calculator = CalculatorWithRecall(
        include=tuple(PML_NAMES.values()), k=None, device=torch.device("cpu")
    )
    as_tensor = lambda a: None if a is None else torch.from_numpy(np.asarray(a))  # noqa: E731
    return calculator.get_accuracy(
        as_tensor(query),
        as_tensor(query_labels),
        as_tensor(reference),
        as_tensor(reference_labels),
    )


def test_single_set_matches_pytorch_metric_learning():
    rng = np.random.default_rng(0)
    # 60 classes over 240 samples: class sizes vary, some are singletons (R = 0).
    labels = rng.integers(0, 60, size=240)
    embeddings = clustered(rng, labels, dim=16, noise=1.2)
    ours = retrieval_metrics(embeddings, labels)
    theirs = pml_metrics(embeddings, labels)
    assert 0 < ours["queries_without_positives"] < 20
    assert 0.1 < ours["recall@1"] < 0.95  # neither trivial nor hopeless
    for name, pml_name in PML_NAMES.items():
        assert ours[name] == pytest.approx(theirs[pml_name], abs=1e-6), name


def test_query_gallery_matches_pytorch_metric_learning():
    rng = np.random.default_rng(1)
    gallery_labels = rng.integers(0, 50, size=400)
    query_labels = rng.integers(0, 60, size=150)  # labels 50-59: not in the gallery, R = 0
    both = clustered(rng, np.concatenate([query_labels, gallery_labels]), dim=24, noise=1.5)
    queries, gallery = both[:150], both[150:]
    ours = retrieval_metrics(queries, query_labels, gallery, gallery_labels)
    theirs = pml_metrics(queries, query_labels, gallery, gallery_labels)
    assert ours["queries_without_positives"] == int((query_labels >= 50).sum()) > 0
    for name, pml_name in PML_NAMES.items():
        assert ours[name] == pytest.approx(theirs[pml_name], abs=1e-6), name


def test_exact_duplicates_do_not_break_recall_at_1():
    v, w = on_circle([0, 120])
    near_v, near_w = on_circle([3, 117])
    # 0,1: the same vector and label; 2,3: the same vector, different labels.
    embeddings = np.stack([v, v, w, w, near_w, near_v])
    labels = ["A", "A", "B", "C", "B", "C"]
    # q0 -> 1 (A) hit; q1 -> 0 (A) hit; q2 -> 3 (C) miss; q3 -> 2 (B) miss;
    # q4 -> 2 and 3 tie, lower index 2 (B) hit; q5 -> 0 and 1 tie, 0 (A) miss.
    # Dropping the first neighbour instead of the query itself would count q3 as a hit.
    result = retrieval_metrics(embeddings, labels, ks=(1,))
    assert result["recall@1"] == pytest.approx(3 / 6)


def test_ties_break_by_index_and_self_is_removed_by_index():
    gallery = np.ones((10, 4), dtype=np.float32) / 2  # all identical: every score ties
    search = ExactSearch(gallery)
    query_ids = np.array([0, 2, 9])
    neighbours = nearest_neighbours(gallery[query_ids], search, 4, query_ids)
    assert neighbours.tolist() == [[1, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 3]]
    # faiss alone may cut a tie group anywhere (faiss 1.15 returns [4, 3] for k=2 here);
    # the cut must keep the lowest indices.
    v, w = on_circle([0, 120])
    near_v, near_w = on_circle([3, 117])
    gallery = np.stack([v, v, w, w, near_w, near_v]).astype(np.float32)
    search = ExactSearch(gallery)
    assert nearest_neighbours(gallery[[4]], search, 2).tolist() == [[4, 2]]
    assert nearest_neighbours(gallery[[4]], search, 1, np.array([4])).tolist() == [[2]]


def test_chunking_gives_the_same_result():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 30, size=200)
    embeddings = clustered(rng, labels, dim=8, noise=1.0)
    whole = retrieval_metrics(embeddings, labels, chunk_size=10_000)
    assert retrieval_metrics(embeddings, labels, chunk_size=7) == whole
    queries, gallery = embeddings[:60], embeddings[60:]
    whole = retrieval_metrics(queries, labels[:60], gallery, labels[60:], chunk_size=10_000)
    chunked = retrieval_metrics(queries, labels[:60], gallery, labels[60:], chunk_size=1)
    assert chunked == whole


def test_evaluate_dims_truncates_renormalises_and_skips():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, size=150)
    informative = clustered(rng, labels, dim=2, noise=0.2)
    embeddings = np.concatenate([informative, 0.8 * rng.normal(size=(150, 6))], axis=1)
    result = evaluate_dims(embeddings, labels, dims=("full", 8, 16, 4, 2))
    assert result["embedding_dim"] == 8
    assert list(result["results"]) == ["full", "4", "2"]
    assert set(result["skipped"]) == {"8", "16"}
    assert "embedding dimension 8" in result["skipped"]["16"]
    assert result["results"]["2"] == retrieval_metrics(informative, labels)
    assert result["results"]["full"] == retrieval_metrics(embeddings, labels)
    # Dropping the noise dimensions must help: the prefix really was used.
    assert result["results"]["2"]["recall@1"] > result["results"]["full"]["recall@1"] + 0.1
    np.testing.assert_allclose(np.linalg.norm(truncate(embeddings, 3), axis=1), 1, rtol=1e-6)


def test_no_relevant_items_gives_nan_and_counts():
    result = retrieval_metrics(CIRCLE[:3], ["A", "B", "C"])
    assert np.isnan(result["recall@1"]) and np.isnan(result["map@r"])
    assert result["queries_without_positives"] == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"query_labels": ["A"] * 5}, "expected 6 labels"),
        ({"ks": (0, 1)}, "positive integers"),
        ({"gallery_emb": np.ones((3, 3)), "gallery_labels": [1, 2, 3]}, "differ in dimension"),
        ({"gallery_emb": np.ones((3, 2))}, "without gallery labels"),
        ({"query_emb": np.full((6, 2), np.nan)}, "NaN"),
        ({"query_labels": ["A", None, "B", "A", "B", "B"]}, "missing"),
    ],
)
def test_bad_input_raises_one_line_error(kwargs, message):
    arguments = {"query_emb": CIRCLE, "query_labels": CIRCLE_LABELS, **kwargs}
    with pytest.raises(UnicomError, match=message):
        retrieval_metrics(**arguments)


def test_cli_writes_metrics_json(tmp_path):
    table = pa.table({"emb": embedding_array(CIRCLE), "label": CIRCLE_LABELS})
    write_parquet(tmp_path / "set.parquet", table)
    out = tmp_path / "metrics.json"
    main([str(tmp_path / "set.parquet"), "--dims", "full", "64", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["results"]["full"]["recall@1"] == pytest.approx(4 / 6, abs=1e-3)
    assert result["skipped"] == {"64": "not below the embedding dimension 2"}
    with pytest.raises(UnicomError, match="missing column 'category'"):
        main([str(tmp_path / "set.parquet"), "--label-column", "category", "--out", str(out)])
