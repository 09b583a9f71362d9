"""The rehearsal of config/laion400m.yaml itself, end to end on this machine: the README's
commands as written (its blocks id=site and id=rehearsal), in a copy of the repository.

Only the two user paths of the README's config/site.yaml are pointed at local stand-ins: the
URL list (a LAION-format Parquet whose URLs a loopback HTTP server answers with openclipart
PNGs, 404s, a stall past the download timeout and a corrupt file) and the open_clip weights (a
randomly initialised ViT-B-32 written to a .safetensors: this proves the path, not the
quality). Everything else is the LAION config under config/rehearsal.yaml: http/https only,
open_clip image+text, fuse mean, faiss k-means, the ViT-B/16 trainer with the partial head at
r1 = 0.1, r2 = 0.5 on 2 gloo ranks, and the evaluation on Fashion-MNIST the LAION config names.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from unicom import formats
from unicom.config import annotated_keys, layered_config
from unicom.rehearsal import REHEARSAL_KEYS, changed_keys

from helpers import REPO
from helpers.processes import loopback_http
from readme import check_result, readme_block, repository_copy, run_block

pytestmark = pytest.mark.slow

LAION_CONFIG = REPO / "config/laion400m.yaml"
REHEARSAL_CONFIG = REPO / "config/rehearsal.yaml"
# The URL list: more rows than the rehearsal takes, so that data.max_rows cuts it.
REHEARSAL = yaml.safe_load(REHEARSAL_CONFIG.read_text())["rehearsal"]
ROWS = REHEARSAL["rows"]  # what the rehearsal takes of the URL list
MISSING, CORRUPT = 5, 3  # besides one stalling URL and one file:// URL
# Good rows (their index among the served pictures) planted for the hygiene: row 11 repeats
# row 10's URL, row 12 serves row 1's bytes under another URL, row 13 is tagged NSFW.
REPEATED_URL, SAME_BYTES, NSFW_ROW = (10, 11), (1, 12), 13
LIST_ROWS = ROWS + 20  # data.max_rows leaves 20 out
GOOD = LIST_ROWS - MISSING - CORRUPT - 2
STALL_SECONDS = 15  # > download.timeout (10 s in config/laion400m.yaml)
# The served PNGs are the openclipart images shrunk to this side at most: some are thousands of
# pixels wide, and decoding those is not what the rehearsal is about.
SERVED_SIDE = 384
MAX_PIXELS = 16_000_000
SNAKEMAKE_TIMEOUT_S = 2400  # ~6 min on 2 free cores; 15-20 min when the machine is shared
SITE_URL_LIST = "/data/laion400m-meta/*.parquet"
SITE_WEIGHTS = "/models/open_clip/ViT-B-32-laion2b_s34b_b79k.safetensors"


def openclipart_pngs() -> dict[str, list[Path]]:
    """Category -> PNG files of Debian's openclipart-png: the repository's resources/ (where
    `make demo` puts it), the system's, or fetched with apt-get download."""
    from unicom.demo.debian import fetch_sources

    def fetch() -> dict:
        return fetch_sources(REPO / "resources", Path("/"), allow_download=True)

    try:
        sources = fetch()
    except Exception:  # a fresh machine may need its package lists first
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        sources = fetch()
    by_category: dict[str, list[Path]] = {}
    for path in sorted(Path(sources["png_root"]).rglob("*.png")):
        if path.is_file() and not path.is_symlink():
            by_category.setdefault(path.parent.name, []).append(path)
    return by_category


def usable(paths: list[Path]) -> list[Path]:
    """Without the few giant PNGs (up to 13,000 px wide) the demo pool drops too."""
    from unicom.demo.pool import image_header_problem

    return [path for path in paths if image_header_problem(path, MAX_PIXELS) is None]


class Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    stop = threading.Event()

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/stall.png":  # answers only after the client gave up
            deadline = time.monotonic() + STALL_SECONDS
            while time.monotonic() < deadline and not self.stop.is_set():
                time.sleep(0.05)
        body = self.files.get(self.path)
        code = 200 if body is not None else 404
        body = body if body is not None else b"not found"
        try:
            self.send_response(code)
            self.send_header("Content-Type", "image/png" if code == 200 else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server():
    with loopback_http(Handler, Handler.stop) as url:
        yield url


def write_inputs(root: Path, base_url: str) -> dict[str, Path]:
    """The LAION-format URL list and the ViT-B-32 weights."""
    pngs = openclipart_pngs()
    # Training rows round-robin over the categories.
    pool = [pngs[c] for c in sorted(pngs)]
    train = [files[i] for i in range(max(map(len, pool))) for files in pool if i < len(files)]
    urls, captions = [], []
    for index, path in enumerate(usable(train[: 2 * GOOD])[:GOOD]):
        Handler.files[f"/img/{index}.png"] = shrunk_png(path)
        urls.append(f"{base_url}/img/{index}.png")
        captions.append(f"{path.parent.name}: {path.stem.replace('_', ' ')}")
    # Planted for the hygiene the LAION config turns on: one URL twice (its scheme in capitals
    # the second time), and one picture's bytes under a second URL.
    urls[REPEATED_URL[1]] = "HTTP" + urls[REPEATED_URL[0]].removeprefix("http")
    Handler.files["/copy/1.png"] = Handler.files[f"/img/{SAME_BYTES[0]}.png"]
    urls[SAME_BYTES[1]] = f"{base_url}/copy/1.png"
    for index in range(CORRUPT):
        Handler.files[f"/corrupt{index}.png"] = b"\x89PNG\r\n\x1a\n these are not PNG chunks"
    bad = [f"{base_url}/missing{i}.png" for i in range(MISSING)]
    bad += [f"{base_url}/corrupt{i}.png" for i in range(CORRUPT)]
    bad += [f"{base_url}/stall.png", "file:///etc/passwd"]
    # Spread the bad rows over the list; all of them within the rows the rehearsal takes.
    for offset, url in enumerate(bad):
        position = 7 + offset * (ROWS // len(bad))
        urls.insert(position, url)
        captions.insert(position, f"a bad row {offset}")
    rows = len(urls)
    assert rows == LIST_ROWS
    (root / "laion400m-meta").mkdir()
    url_list = root / "laion400m-meta/part-00000.parquet"
    pq.write_table(
        pa.table(
            {
                "SAMPLE_ID": pa.array(range(1000, 1000 + rows), pa.int64()),
                "URL": urls,
                "TEXT": captions,
                "HEIGHT": pa.array([256] * rows, pa.int32()),
                "WIDTH": pa.array([256] * rows, pa.int32()),
                "LICENSE": ["?"] * rows,
                # one row LAION tagged NSFW: the LAION config's filter drops it
                "NSFW": [
                    "NSFW" if url.endswith(f"/img/{NSFW_ROW}.png") else "UNLIKELY" for url in urls
                ],  # fmt: skip
                "similarity": pa.array([0.3 + (i % 10) / 100 for i in range(rows)], pa.float64()),
            }
        ),
        url_list,
    )
    weights = root / "vit-b-32-random.safetensors"
    write_random_clip(weights)
    return {"url_list": url_list, "weights": weights}


def shrunk_png(path: Path) -> bytes:
    with Image.open(path) as image:
        image.thumbnail((SERVED_SIDE, SERVED_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_random_clip(path: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, server):
    root = tmp_path_factory.mktemp("rehearsal")
    inputs = write_inputs(root, server)
    clone = repository_copy(root / "clone")
    # The Debian packages' cache of this repository (Fashion-MNIST, fetched once).
    (clone / "resources").symlink_to(REPO / "resources", target_is_directory=True)
    fixtures = {
        SITE_URL_LIST: str(inputs["url_list"].parent / "*.parquet"),
        SITE_WEIGHTS: str(inputs["weights"]),
    }
    started = time.monotonic()
    for block in (readme_block("site"), readme_block("rehearsal")):
        result = run_block(block, clone, fixtures, timeout=SNAKEMAKE_TIMEOUT_S)
        problems = check_result(block, result)
        if problems:
            raise AssertionError("\n".join(problems))
    print(
        f"rehearsal of config/laion400m.yaml: {time.monotonic() - started:.0f} s", file=sys.stderr
    )
    return {
        "root": root,
        "clone": clone,
        "results": clone / "results-laion400m-rehearsal",
        **inputs,
    }


def test_rehearsal_runs_the_laion_config_to_the_summary_and_the_report(rehearsal):
    results = rehearsal["results"]
    summary = pd.read_csv(results / "evaluate/summary.csv")
    # The LAION config's own benchmark: Fashion-MNIST, base encoder and trained model alike.
    assert set(zip(summary["model"], summary["dataset"], strict=True)) == {
        ("base", "fashion-mnist"),
        ("trained", "fashion-mnist"),
    }
    assert (summary["queries"] == REHEARSAL["evaluate_images"]).all()
    # The config it ran with is the LAION config + the site file + the rehearsal, nothing else.
    clone = rehearsal["clone"]
    ran = yaml.safe_load((results / "config.yaml").read_text())
    site = clone / "config/site.yaml"
    assert ran == layered_config([LAION_CONFIG, site, REHEARSAL_CONFIG])
    assert ran["embed"]["open_clip"]["pretrained"] == str(rehearsal["weights"])
    # The README's --report command wrote the report, with the run's plots in it.
    report = (results / "report.html").read_text()
    assert "retrieval.png" in report and "training.png" in report


def test_download_over_http_accounts_for_every_row(rehearsal):
    results = rehearsal["results"]
    manifest = json.loads((results / "parts/manifest.json").read_text())
    # shards_per_job 10 of the LAION config: the rows in 10 shards, one job per stage.
    assert len(manifest["parts"]) == 10 and manifest["rows_left_out"] == LIST_ROWS - ROWS
    summary = json.loads((results / "download/summary.json").read_text())
    counts = summary["counts"]
    assert summary["input_rows"] == ROWS and sum(counts.values()) == ROWS
    assert summary["left_out_beyond_max_rows"] == LIST_ROWS - ROWS
    assert counts["rejected_scheme"] == 1  # file:///etc/passwd, never opened
    assert counts["success"] == ROWS - MISSING - CORRUPT - 2 - 1  # one URL repeated
    assert counts["duplicate_url"] == 1
    assert counts["failed_to_download"] == MISSING + 1  # 404s and the stall
    assert counts["failed_to_resize"] == CORRUPT
    tables = pd.concat(pd.read_parquet(p) for p in sorted((results / "shards").glob("*.parquet")))
    by_url = dict(zip(tables["url"], tables["error_message"], strict=True))
    assert "not in download.allowed_schemes" in by_url["file:///etc/passwd"]
    missing = next(u for u in by_url if u.endswith("/missing0.png"))
    assert "404" in by_url[missing]
    stall = next(u for u in by_url if u.endswith("/stall.png"))
    assert "timed out" in by_url[stall].lower() or "timeout" in by_url[stall].lower()


def test_the_laion_hygiene_drops_the_planted_rows_and_counts_every_row(rehearsal):
    results = rehearsal["results"]
    tables = pd.concat(pd.read_parquet(p) for p in sorted((results / "shards").glob("*.parquet")))
    fetched = tables[tables["status"] == "success"]
    key = {url.rsplit("/", 2)[-2] + "/" + url.rsplit("/", 1)[-1]: k
           for url, k in zip(fetched["url"], fetched["key"], strict=True)}  # fmt: skip
    repeated = tables[tables["status"] == "duplicate_url"]
    assert repeated["duplicate_of"].tolist() == [key[f"img/{REPEATED_URL[0]}.png"]]
    screened = pd.read_parquet(results / "hygiene/screened.parquet").set_index("key")
    assert screened.loc[key["copy/1.png"], "reason"] == "duplicate_content"
    assert screened.loc[key["copy/1.png"], "twin"] == key[f"img/{SAME_BYTES[0]}.png"]
    assert screened.loc[key[f"img/{NSFW_ROW}.png"], "detail"] == "NSFW != 'NSFW'"
    # openclipart files one picture under several categories (symlinks): the served list has
    # a few more byte-identical pictures than the planted one, each with an earlier twin
    repeats = screened[screened["reason"] == "duplicate_content"]
    assert (repeats.index > repeats["twin"]).all() and set(screened["reason"]) == {
        "duplicate_content",
        "filtered",
    }
    # two near-duplicate jobs (dedup.groups 1000 capped by the rehearsal), each its own clusters
    stats = [json.loads(p.read_text()) for p in sorted((results / "hygiene/near").glob("*.json"))]
    assert len(stats) == 2 and sum(s["clusters"] for s in stats) <= REHEARSAL["k"]
    summary = json.loads((results / "hygiene/summary.json").read_text())
    assert sum(summary["rows"].values()) == summary["url_list_rows"] == LIST_ROWS
    data = json.loads((results / "train/data.json").read_text())["totals"]
    assert data["duplicate_content"] == len(repeats) and data["filtered"] == 1
    assert data["kept"] == summary["rows"]["kept"]


def test_embeddings_are_open_clip_image_and_text_fused_by_mean(rehearsal):
    results = rehearsal["results"]
    fused = sorted((results / "fused").glob("*.parquet"))
    assert len(fused) == 10
    identity = formats.read_metadata(str(fused[0]), formats.ENCODER_METADATA_KEY)
    assert identity["encoder"] == "open_clip" and identity["shared_space"] is True
    for tower in ("image", "text"):  # one CLIP model, the local weights the test wrote
        assert identity[tower]["model"] == "ViT-B-32" and identity[tower]["dim"] == 512
        assert identity[tower]["weights"] == f"file:{rehearsal['weights'].name}"
    fusion = formats.read_metadata(str(fused[0]), formats.FUSION_METADATA_KEY)
    assert fusion["mode"] == "mean"
    kmeans = json.loads((results / "kmeans/kmeans.json").read_text())
    assert kmeans["k"] == REHEARSAL["k"] and kmeans["options"]["max_points_per_centroid"] == 32
    assert kmeans["options"]["init"] == "random" and kmeans["d"] == 512


def test_training_used_the_laion_trainer_and_sampled_negatives(rehearsal):
    results = rehearsal["results"]
    info = json.loads((results / "train/model.json").read_text())
    assert info["model"] == "vit_base_patch16_224" and info["image_size"] == 224
    assert info["dim"] == 512 and info["pretrained"] is None
    k, ranks = REHEARSAL["k"], REHEARSAL["ranks"]
    assert info["training"]["world_size"] == ranks and info["training"]["num_classes"] == k
    metrics = [
        json.loads(line) for line in (results / "train/metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["step"] == REHEARSAL["steps"]
    # r1 = 0.1 of k / ranks prototypes per rank, above the most labels a step can hold (8): the
    # head used a strict subset of the k classes, random negatives included.
    per_rank = round(0.1 * k / ranks)
    assert per_rank > REHEARSAL["batch_size"] * ranks
    assert all(m["head_prototypes"] == per_rank * ranks < k for m in metrics)
    assert any(m["head_negatives"] > 0 for m in metrics)


def test_the_rehearsal_changes_only_its_keys():
    plain = layered_config([LAION_CONFIG], {"data": {"url_list": ["urls.parquet"]}})
    rehearsed = layered_config(
        [LAION_CONFIG, REHEARSAL_CONFIG], {"data": {"url_list": ["urls.parquet"]}}
    )
    changed = changed_keys(plain, rehearsed)
    scheduler = set(annotated_keys("x-scheduler"))
    assert changed - {"rehearsal.enabled"} <= REHEARSAL_KEYS | scheduler
    # What the rehearsal must keep: the encoders, fusion, k-means options and the trainer.
    for key in (
        "embed.encoder", "embed.open_clip.model", "embed.open_clip.pretrained", "fuse.mode",
        "kmeans.max_points_per_centroid", "kmeans.init", "kmeans.niter", "train.model",
        "train.image_size", "train.dim", "train.sample_rate", "train.feature_rate",
        "train.margin", "train.scale", "download.allowed_schemes", "download.shards_per_job",
    ):  # fmt: skip
        assert key not in changed, key


def test_rehearsal_keys_are_exactly_these():
    assert REHEARSAL_KEYS == {
        "output_dir", "data.max_rows", "kmeans.k", "dedup.groups", "train.steps",
        "train.batch_size",
        "train.grad_accum_steps", "train.nodes", "train.nproc_per_node", "train.pretrained",
        "train.num_workers", "embed.batch_size", "embed.num_workers", "evaluate.batch_size",
        "evaluate.num_workers", "evaluate.max_images",
    }  # fmt: skip
    assert set(annotated_keys("x-scheduler")) == {
        f"{section}.{key}"
        for section in ("embed", "kmeans", "assign", "train", "evaluate", "linear_probe")
        for key in ("threads", "gpus", "mem_mb", "runtime")
    } | {"download.mem_mb", "download.runtime", "assign.diagnostics.mem_mb",
         "assign.diagnostics.runtime", "dedup.threads", "dedup.mem_mb", "dedup.runtime"}  # fmt: skip
