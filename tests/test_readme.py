"""Every command block of README.md and of the docs pages (docs/*.md) runs as written
(tests/readme.py says how), in a copy of the repository, with only the user's paths (/data,
/models) pointed at fixtures."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import existing_shards
from helpers import REPO
from readme import (
    README,
    all_blocks,
    check_copy,
    check_result,
    command_blocks,
    readme_block,
    repository_copy,
    run_block,
    user_paths,
    with_fixtures,
)

pytestmark = pytest.mark.slow

# The LAION URL list's rows: as many as kmeans.k (1M) of config/laion400m.yaml, so that every
# parse-time check passes as it would on LAION's own files.
URL_ROWS = 1_000_000


def laion_url_list(path: Path, rows: int) -> None:
    """A LAION-format metadata Parquet (the columns config/laion400m.yaml reads)."""
    index = pa.array(np.arange(rows, dtype=np.int64))
    urls = pa.compute.binary_join_element_wise(
        "http://127.0.0.1:9/img/", pa.compute.cast(index, pa.string()), ".jpg", ""
    )
    table = pa.table(
        {
            "SAMPLE_ID": index,
            "URL": urls,
            "TEXT": pa.array(["a photo of a cat"] * rows).dictionary_encode(),
            "LICENSE": pa.array(["?"] * rows).dictionary_encode(),
            "NSFW": pa.array(["UNLIKELY"] * rows).dictionary_encode(),
            "similarity": pa.array(np.full(rows, 0.31)),
        }
    )
    pq.write_table(table, path)


def trained_export(directory: Path) -> None:
    """A small model exported the way unicom.train exports one (same code, random weights)."""
    from unicom.formats import MODEL_FORMAT
    from unicom.models import build_model, export_model, preprocessing

    options = {"model": "resnet18", "model_kwargs": {}, "pretrained": None, "seed": 0, "dim": 8}
    model = build_model(options)
    info = {
        "format": MODEL_FORMAT,
        **{key: options[key] for key in ("model", "model_kwargs", "pretrained", "dim")},
        "image_size": 32,
        **preprocessing(model),
        "weights": "model.safetensors",
    }
    export_model(directory, model, info)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    """The user paths of the README and the docs -> local stand-ins."""
    root = tmp_path_factory.mktemp("user")
    (root / "laion400m-meta").mkdir()
    laion_url_list(root / "laion400m-meta/part-00000.parquet", URL_ROWS)
    weights = root / "ViT-B-32.safetensors"  # planned, never loaded by a dry run
    weights.write_bytes(b"")
    photo = root / "cat.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(photo)
    # existing shards (the real img2dataset's, with LAION's columns) and the embeddings the real
    # clip-retrieval made of them (docs/existing-data.md)
    shards = existing_shards.build_shards(root, laion_columns=True)
    return {
        "/data/laion400m-data/*.tar": str(shards / "*.tar"),
        "/data/laion400m-embeddings": str(REPO / "tests/fixtures/clip_retrieval"),
        "/data/laion400m-meta/*.parquet": str(root / "laion400m-meta/*.parquet"),
        "/models/open_clip/ViT-B-32-laion2b_s34b_b79k.safetensors": str(weights),
        "/data/photos/cat.jpg": str(photo),
    }


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    clone = repository_copy(tmp_path_factory.mktemp("clone"))
    trained_export(clone / "results/train")  # what the demo leaves for "Using a trained model"
    return clone


def test_every_readme_and_docs_command_runs_as_written(clone, fixtures):
    problems = []
    blocks = all_blocks()
    for block in blocks:
        if block.mode == "copy":
            problems += check_copy(block, blocks)
            continue
        if block.mode == "elsewhere":
            test_file = REPO / block.options["by"]
            if f'readme_block("{block.id}")' not in test_file.read_text():
                problems.append(f"{block.where}: {test_file.name} does not run id={block.id}")
            continue
        problems += check_result(block, run_block(block, clone, fixtures))
    assert not problems, "\n".join(problems)


def test_a_broken_command_fails_the_check(clone, fixtures, tmp_path):
    broken_readme = README.read_text().replace(
        "config/site.yaml config/one-node.yaml", "config/site.yaml config/one-nod.yaml", 1
    )
    block = next(b for b in command_blocks(broken_readme) if b.id == "one-node")
    problems = check_result(block, run_block(block, clone, fixtures))
    assert problems and "one-nod.yaml" in problems[0]
    # ... and a right command whose plan differs from what the README states.
    wrong_count = README.read_text().replace("train:1,evaluate:2,near", "train:1,evaluate:3,near")
    block = next(b for b in command_blocks(wrong_count) if b.id == "one-node")
    assert check_result(block, run_block(block, clone, fixtures)) == [
        f"{block.where}: planned 2 evaluate jobs, not 3"
    ]


def test_every_block_says_how_it_is_checked(tmp_path):
    unmarked = "Some text\n\n```bash\nsnakemake -n\n```\n"
    with pytest.raises(ValueError, match="a bash block without a <!-- test: ... --> line"):
        command_blocks(unmarked, tmp_path / "DOC.md")
    with pytest.raises(ValueError, match="starts with none of"):
        command_blocks("<!-- test: maybe -->\n```bash\ntrue\n```\n", tmp_path / "DOC.md")


def test_user_paths_are_only_the_marked_ones():
    text = readme_block("site").text
    assert user_paths(text) == [
        "/data/laion400m-meta/*.parquet",
        "/models/open_clip/ViT-B-32-laion2b_s34b_b79k.safetensors",
    ]
    with pytest.raises(KeyError, match="/data/other"):
        with_fixtures("ls /data/other /data/laion", {"/data/laion": "/tmp/x"})
    # results/..., config/... and the rest stay as written
    assert re.search(r"/data/", with_fixtures(text, dict.fromkeys(user_paths(text), "X"))) is None
