"""The ablation grid's plan: which stage outputs each variant shares, and one-line config errors."""

from __future__ import annotations

import json

import pytest

from unicom.ablations import grid
from unicom.ablations.table import check_sampling, grid_rows, mean_std, to_markdown
from unicom.config import layered_config
from unicom.errors import UnicomError

from helpers import REPO

DEMO = str(REPO / "config/config.yaml")


def demo_grid(**ablations) -> grid.Grid:
    return grid.plan(layered_config([DEMO], {"ablations": ablations}))


def test_each_stage_is_keyed_by_what_it_depends_on():
    plan = demo_grid(
        seeds=[0, 1],
        axes={"train.feature_rate": [1.0], "fuse.mode": ["image"], "kmeans.k": [256]},
        variants={"same_as_r2": {"train.feature_rate": 1.0}},
    )
    variants = plan.variants
    assert list(variants) == ["baseline", "feature_rate=1.0", "mode=image", "k=256", "same_as_r2"]
    # The baseline at the run's own seed is the run's own model; seed 1 trains again.
    assert variants["baseline"].trainings == {0: None, 1: "baseline__seed=1"}
    # r2 reuses the run's fused files and clusters.
    r2 = variants["feature_rate=1.0"]
    assert (r2.fusion, r2.clustering) == (None, None)
    assert r2.trainings[0] == "train.feature_rate=1.0__seed=0"
    # A fusion variant fuses and clusters again; a k variant only clusters again.
    assert (variants["mode=image"].fusion, variants["mode=image"].clustering) == (
        "fuse.mode=image",
        "fuse.mode=image",
    )
    assert (variants["k=256"].fusion, variants["k=256"].clustering) == (None, "kmeans.k=256")
    assert plan.clustering_fusion == {"fuse.mode=image": "fuse.mode=image", "kmeans.k=256": None}
    # Two variants with the same settings share their outputs.
    assert variants["same_as_r2"].trainings == r2.trainings
    assert len(plan.trainings) == 1 + 2 + 2 + 2  # baseline seed 1, then 3 variants x 2 seeds
    assert plan.trainings["kmeans.k=256__seed=1"]["train"]["seed"] == 1
    assert plan.trainings["kmeans.k=256__seed=1"]["kmeans"]["k"] == 256
    assert plan.axes == ["train.feature_rate", "fuse.mode", "kmeans.k"]


def test_the_demo_grid_plans_its_variants():
    plan = grid.plan(layered_config([DEMO, str(REPO / "config/ablations.yaml")], {}))
    assert len(plan.variants) == 9 and plan.seeds == [0, 1, 2]
    assert len(plan.trainings) == 9 * 3 - 1
    assert sorted(plan.clusterings) == ["fuse.mode=image", "fuse.mode=text", "kmeans.k=1024"]
    # sample_rate 1.0 is the demo's own, so the first of the r1 pair is the k variant.
    assert plan.variants["k=1024_r1=1.0"].trainings[0] == "kmeans.k=1024__seed=0"
    # The r1 pair really samples: round(0.1 k) above the distinct labels of one batch.
    sampled = plan.variants["k=1024_r1=0.1"].config
    batch, k = sampled["train"]["batch_size"], sampled["kmeans"]["k"]
    assert round(sampled["train"]["sample_rate"] * k) > batch


@pytest.mark.parametrize(
    ("ablations", "message"),
    [
        ({"axes": {"train.feature_rte": [1.0]}}, "ablations.axes.train.feature_rte: .* not a key"),
        ({"axes": {"train.feature_rate": []}}, "ablations.axes.train.feature_rate: empty value"),
        ({"axes": {"embed.encoder": ["open_clip"]}}, "ablations.axes.embed.encoder: .* shared"),
        ({"axes": {"train.threads": [4]}}, "ablations.axes.train.threads: .* changes no result"),
        ({"axes": {"train.seed": [1]}}, "ablations.axes.train.seed: vary train.seed with"),
        (
            {"axes": {"train.positives": [8]}},
            "variant positives=8: config key train.positives: 8 positives .* assign keeps only",
        ),
        ({"axes": {"train.feature_rate": [2.0]}}, "variant feature_rate=2.0: config key train"),
        ({"variants": {"x": {}}}, "ablations.variants.x: changes no key"),
        ({"variants": {"a b": {"kmeans.k": 8}}}, "variant name 'a b' is not a short plain name"),
        ({"compact_dim": 48}, "ablations.compact_dim: 48 is not in evaluate.dims"),
    ],
)
def test_bad_grid_is_one_line_naming_the_key(ablations, message):
    with pytest.raises(UnicomError, match=message) as info:
        demo_grid(**ablations)
    assert "\n" not in str(info.value)


def test_ids_are_plain_path_components_or_hashes():
    assert grid.stage_id({}) is None
    assert grid.stage_id({"kmeans.k": 256, "train.sample_rate": 0.1}) == (
        "kmeans.k=256__train.sample_rate=0.1"
    )
    hashed = grid.stage_id({"train.augment.scale": [0.2, 1.0]})
    assert hashed.startswith("h") and len(hashed) == 13
    assert grid.fused_pattern(None) == "fused/{part}.parquet"
    assert (
        grid.assign_pattern("kmeans.k=256")
        == "ablations/clusters/kmeans.k=256/assign/{part}.parquet"
    )


def run(variant, seed, overrides=None, sample_rate=1.0, k=64):
    return {
        "variant": variant,
        "axis": None,
        "overrides": overrides or {},
        "seed": seed,
        "train_dir": f"{variant}/{seed}",
        "sample_rate": sample_rate,
        "k": k,
        "evaluations": {"set": f"{variant}/{seed}/set.json"},
    }


def evaluation(r1, mapr):
    scores = {"recall@1": r1, "map@r": mapr}
    return {"model": "m", "results": {"full": scores, "64": scores}}


def test_table_means_stds_and_differences():
    runs = [run("baseline", s) for s in (0, 1, 2)] + [run("r2", s, {"k": 1}) for s in (0, 1, 2)]
    values = {"baseline": [0.5, 0.6, 0.7], "r2": [0.8, 0.8, 0.8]}
    maps = {"baseline": [0.3, 0.3, 0.3], "r2": [0.1, 0.2, 0.3]}
    evaluations = {
        r["evaluations"]["set"]: evaluation(
            values[r["variant"]][r["seed"]], maps[r["variant"]][r["seed"]]
        )
        for r in runs
    }
    sampling = {r["train_dir"]: {"negatives": 3.0, "prototypes": 10.0} for r in runs}
    rows = grid_rows(runs, evaluations, sampling, 64)
    full = {row["variant"]: row for row in rows if row["dim"] == "full"}
    assert full["baseline"]["recall@1_mean"] == pytest.approx(0.6)
    assert full["baseline"]["recall@1_std"] == pytest.approx(0.1)
    assert full["r2"]["delta_recall@1"] == pytest.approx(0.2)
    assert full["r2"]["delta_over_se_recall@1"] == pytest.approx(0.2 / (0.1 / 3**0.5))
    assert full["r2"]["delta_map@r"] == pytest.approx(-0.1)
    assert full["r2"]["delta_over_se_map@r"] == pytest.approx(-0.1 / (0.1 / 3**0.5))
    assert "| +0.2000 (+3.5) | -0.1000 (-1.7) |" in to_markdown(rows)
    assert mean_std([0.3]) == (0.3, 0.0)
    assert "**baseline**" in to_markdown(rows) and "0.6000 ± 0.1000" in to_markdown(rows)
    json.dumps(rows)  # plain values only


def test_a_sampled_variant_that_sampled_nothing_fails():
    with pytest.raises(
        UnicomError, match=r"r1 \(seed 0\): train.sample_rate 0.1 drew 0.0 negatives"
    ):
        check_sampling(run("r1", 0, sample_rate=0.1), {"negatives": 0.0, "prototypes": 6.0})
    check_sampling(run("r1", 0, sample_rate=0.1, k=1024), {"negatives": 40.0, "prototypes": 102.0})
