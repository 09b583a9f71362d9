"""Data hygiene end to end: the real DAG (split with URL dedup, img2dataset on file:// URLs,
embed, screen, k-means, near-duplicates within clusters, training) on a URL list with planted
duplicates: the same URL three times, one picture under two URLs, and a re-encoded, resized
copy of a picture. Each must get the right status and twin, and every row stays counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageDraw

from unicom.data.split_urls import part_sizes, row_keys

from helpers.workflow import DEMO_CONFIG, TEST_CONFIG, job_counts, snakemake_with

pytestmark = pytest.mark.slow


ROWS, SHARD_SIZE = 53, 14


def key_of(row: int) -> str:
    """The sample key of URL-list row ``row`` (4 parts of 14, 13, 13, 13 rows)."""
    return row_keys(np.array([row]), part_sizes(ROWS, SHARD_SIZE))[0]


def distinctive_picture(path: Path, size: int = 96) -> Path:
    """Coloured discs on a dark ground: unlike the test folder's one-shape pictures (whose
    image embeddings are up to 0.98 alike), so only its own copy can be its near-duplicate."""
    rng = np.random.default_rng(6)
    picture = Image.new("RGB", (size, size), (20, 20, 60))
    draw = ImageDraw.Draw(picture)
    for _ in range(14):
        x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
        w, h = (int(v) for v in rng.integers(10, 40, 2))
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    picture.save(path)
    return path


@pytest.fixture(scope="module")
def hygiene_run(tmp_path_factory, small_image_folder) -> Path:
    workdir = tmp_path_factory.mktemp("hygiene")
    images = sorted(small_image_folder.rglob("*.png"))
    planted = workdir / "planted"
    planted.mkdir()
    same_bytes = planted / "copy_of_b.png"
    shutil.copyfile(images[1], same_bytes)
    original = distinctive_picture(planted / "discs.png")
    reencoded = planted / "discs_smaller.jpg"
    with Image.open(original) as picture:
        picture.convert("RGB").resize((80, 80)).save(reencoded, quality=85)
    urls = [p.as_uri() for p in images]
    # rows 48, 49: image 0's URL again (the second with its scheme in capitals: the same URL);
    # 50: image 1's bytes under another URL; 51: a new picture; 52: it re-encoded and resized
    urls += [images[0].as_uri(), "FILE://" + images[0].as_uri()[len("file://") :]]
    urls += [same_bytes.as_uri(), original.as_uri(), reencoded.as_uri()]
    assert len(urls) == ROWS
    url_list = workdir / "urls.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [Path(u).stem for u in urls]}), url_list)
    config = json.loads(json.dumps(TEST_CONFIG))
    config.update(
        data={"url_list": [str(url_list)], "url_col": "URL", "caption_col": "TEXT",
              "extra_cols": []},
        download={**config["download"], "allowed_schemes": ["file"], "shard_size": SHARD_SIZE},
        dedup={"urls": True, "content": True, "near": True, "space": "image",
               "threshold": 0.97, "groups": 2},
        assign={"min_cluster_size": 2, "diagnostics": {"label_columns": []}},
    )  # fmt: skip
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake_with(
        workdir,
        [DEMO_CONFIG, workdir / "config.yaml"],
        "results/hygiene/summary.json",
        "results/train/data.json",
    )
    return workdir


def all_rows(results: Path, pattern: str) -> list[dict]:
    return [
        row for path in sorted(results.glob(pattern)) for row in pq.read_table(path).to_pylist()
    ]


def test_each_planted_duplicate_has_its_status_and_twin(hygiene_run):
    results = hygiene_run / "results"
    shards = {row["key"]: row for row in all_rows(results, "shards/*.parquet")}
    assert len(shards) == ROWS
    for row in (48, 49):
        assert shards[key_of(row)]["status"] == "duplicate_url"
        assert shards[key_of(row)]["duplicate_of"] == key_of(0)
    assert shards[key_of(50)]["status"] == "success"  # a new URL: downloaded, then screened
    screened = {row["key"]: row for row in all_rows(results, "hygiene/screened.parquet")}
    assert screened == {
        key_of(50): screened[key_of(50)] | {"reason": "duplicate_content", "twin": key_of(1)}
    }
    near = {row["key"]: row for row in all_rows(results, "hygiene/near/*.parquet")}
    pair = {key_of(51), key_of(52)}
    linked = [row for key, row in near.items() if key in pair]
    assert len(linked) == 1 and {linked[0]["key"], linked[0]["twin"]} == pair
    assert linked[0]["similarity"] > 0.97
    # the folder's look-alike pictures (same shape, similar colours) may be near-duplicates
    # of each other, never of the planted picture
    assert not pair & {row["twin"] for key, row in near.items() if key not in pair}
    # no row has two reasons, and no dropped row is anyone's twin
    assert not set(near) & set(screened)
    assert not {row["twin"] for row in near.values()} & set(near)


def test_every_row_is_counted_once_and_training_skips_the_drops(hygiene_run):
    results = hygiene_run / "results"
    summary = json.loads((results / "hygiene/summary.json").read_text())
    rows = summary["rows"]
    assert sum(rows.values()) == summary["url_list_rows"] == ROWS
    assert rows["duplicate_url"] == 2 and rows["duplicate_content"] == 1
    near = sum(1 for _ in all_rows(results, "hygiene/near/*.parquet"))
    assert rows["near_duplicate"] == near >= 1 and rows["kept"] == ROWS - 2 - 1 - near
    download = json.loads((results / "download/summary.json").read_text())
    assert download["counts"] == {"duplicate_url": 2, "success": ROWS - 2}
    totals = json.loads((results / "train/data.json").read_text())["totals"]
    assert totals["duplicate_content"] == 1 and totals["near_duplicate"] == near
    assert totals["kept"] == rows["kept"]
    # every sample of a shard the run read, once: trained on, or left out under one reason
    shards = json.loads((results / "train/data.json").read_text())["shards"]
    reasons = ("ambiguous", "duplicate_content", "filtered", "near_duplicate", "unlabelled")
    read = [counts for counts in shards.values() if counts["tar_samples"] is not None]
    assert read and all(c["unlabelled"] == 0 for c in read)
    for counts in read:
        assert counts["tar_samples"] == counts["kept"] + sum(counts[r] for r in reasons)
    kmeans = json.loads((results / "kmeans/kmeans.json").read_text())
    assert kmeans["skipped_by_screen"] == 1 and kmeans["vectors"] == ROWS - 3
    assert (results / "hygiene/accounting.png").stat().st_size > 0
    assert (results / "hygiene/near_duplicates.png").stat().st_size > 0


def test_a_new_threshold_reruns_only_the_near_duplicate_search_and_what_follows(hygiene_run):
    result = snakemake_with(
        hygiene_run,
        [DEMO_CONFIG, hygiene_run / "config.yaml"],
        "-n",
        "results/hygiene/summary.json",
        "results/train/data.json",
        "--config",
        "dedup={urls: true, content: true, near: true, space: image, threshold: 1.0, groups: 2}",
    )
    assert job_counts(result) == {"near_dedup": 2, "hygiene_report": 1, "train": 1}
