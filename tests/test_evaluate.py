import json

import pandas as pd
import pytest
import torch

from unicom.benchmarks import sets
from unicom.benchmarks.sets import cap_set, stratified_subset
from unicom.evaluate.evaluate import main
from unicom.evaluate.summary import summary_rows, to_csv, to_markdown

EMBED = {"encoder": "demo", "demo": {"image_size": 64}}
OPTIONS = {
    "datasets": {},
    "ks": [1, 2],
    "dims": ["full", 64],
    "max_images": None,
    "seed": 0,
    "batch_size": 16,
    "num_workers": 0,
    "device": "cpu",
    "threads": 1,
}


def test_stratified_subset_keeps_every_label_in_proportion():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    idx = stratified_subset(labels, 50, seed=1)
    picked = [labels[i] for i in idx]
    assert (picked.count("a"), picked.count("b"), picked.count("c")) == (30, 15, 5)
    assert list(idx) == sorted(set(idx))
    assert list(idx) == list(stratified_subset(labels, 50, seed=1))
    assert len(stratified_subset(labels, 500, seed=1)) == 100


def test_cap_keeps_the_gallery_of_a_query_gallery_set():
    dataset = sets.RetrievalSet(
        "x",
        sets.QUERY_GALLERY,
        "test",
        items=tuple(range(30)),
        labels=tuple("ab" * 15),
        num_queries=20,
        root="/",
    )
    capped = cap_set(dataset, 10, seed=0)
    assert capped.num_queries == 10
    assert capped.gallery_items == dataset.gallery_items


@pytest.fixture()
def heldout(tmp_path, small_image_folder):
    paths = sorted(small_image_folder.rglob("*.png"))
    table = pd.DataFrame(
        {"path": [str(p) for p in paths], "category": [p.parent.name for p in paths]}
    )
    table.to_parquet(tmp_path / "heldout.parquet")
    return tmp_path / "heldout.parquet"


def test_base_encoder_on_a_labelled_set(tmp_path, heldout):
    out = tmp_path / "metrics.json"
    main(
        [
            "--model",
            "base",
            "--dataset",
            "openclipart",
            "--dataset-path",
            str(heldout),
            "--out",
            str(out),
            "--options-json",
            json.dumps(OPTIONS),
            "--embed-options-json",
            json.dumps(EMBED),
        ]
    )
    result = json.loads(out.read_text())
    assert result["embedding_dim"] == 1280 and result["dataset"]["items"] == 48
    assert set(result["results"]) == {"full", "64"}
    # Four visually distinct synthetic categories: ImageNet features separate them well.
    assert result["results"]["full"]["recall@1"] > 0.9
    rows = summary_rows([result])
    assert [(r["model"], r["dim"]) for r in rows] == [("base", 1280), ("base", 64)]
    assert to_csv(rows).splitlines()[0].startswith("protocol,model,dataset,dim,recall@1")
    assert {r["protocol"] for r in rows} == {"zero-shot retrieval"}
    assert to_markdown(rows).count("\n") == 4


def test_absent_dataset_is_one_line(tmp_path, capsys):
    from unicom.cli import run_cli

    with pytest.raises(SystemExit):
        run_cli(
            main,
            [
                "--model",
                "base",
                "--dataset",
                "cub",
                "--out",
                str(tmp_path / "m.json"),
                "--options-json",
                json.dumps(OPTIONS),
                "--embed-options-json",
                json.dumps(EMBED),
            ],
        )
    assert capsys.readouterr().err.strip() == "unicom: error: cub: skipped, no path configured"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_bad_device_names_evaluate_device(tmp_path, capsys):
    from unicom.cli import run_cli

    with pytest.raises(SystemExit):
        run_cli(
            main,
            [
                "--model", "base", "--dataset", "cub", "--out", str(tmp_path / "m.json"),
                "--options-json", json.dumps({**OPTIONS, "device": "cuda"}),
                "--embed-options-json", json.dumps(EMBED),
            ],
        )  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert (
        error == "unicom: error: config key evaluate.device: 'cuda' but no CUDA device is available"
    )
