"""unicom.data.download against a loopback HTTP server, with the real img2dataset (no mocks)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unicom.cli import run_cli
from unicom.config import section_options
from unicom.data.accounting import error_kind
from unicom.data.download import (
    download_part,
    download_parts,
    merge_rows,
    output_schema,
    partition_by_scheme,
    prepare_work_dir,
    rejection_reason,
    summarize,
)
from unicom.data.rekey import rewrite_tar_keys
from unicom.errors import UnicomError
from unicom.formats import global_key
from unicom.synthetic import write_tar

from helpers.processes import gone, loopback_http, scheduler_env

SLOW_SECONDS = 3.0
TIMEOUT = 1


def image_bytes(fmt: str, size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


GOOD = {
    f"/good{i}.{ext}": (
        image_bytes(fmt, (40 + 7 * i, 30 + 5 * i), (40 * i, 90, 200 - 30 * i)),
        mime,
    )
    for i, (ext, fmt, mime) in enumerate(
        [("png", "PNG", "image/png"), ("jpg", "JPEG", "image/jpeg")] * 3
    )
}


class Handler(BaseHTTPRequestHandler):
    stop = threading.Event()

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass

    def send(self, code: int, body: bytes, mime: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        if self.path in GOOD:
            self.send(200, *GOOD[self.path])
        elif self.path == "/corrupt.jpg":
            self.send(200, b"\xff\xd8\xff\xe0 these are not the bytes of a JPEG", "image/jpeg")
        elif self.path == "/page.html":
            self.send(200, b"<html><body>not an image</body></html>", "text/html")
        elif self.path == "/tiny.png":  # below min_image_size
            self.send(200, image_bytes("PNG", (4, 4), (0, 0, 0)), "image/png")
        elif self.path == "/noai.png":  # the site opts out of AI use
            self.send(200, GOOD["/good0.png"][0], "image/png", {"X-Robots-Tag": "noai"})
        elif self.path.startswith("/stall"):  # until the server stops
            self.stop.wait(120)
            self.send(200, *GOOD["/good1.jpg"])
        elif self.path == "/slow.jpg":
            deadline = time.monotonic() + SLOW_SECONDS
            while time.monotonic() < deadline and not self.stop.is_set():
                time.sleep(0.05)
            self.send(200, *GOOD["/good1.jpg"])
        else:
            self.send(404, b"not found", "text/plain")


@pytest.fixture(scope="module")
def server():
    with loopback_http(Handler, Handler.stop) as url:
        yield url


def write_part(path: Path, rows: list[tuple[str, str]]) -> None:
    urls = [url for url, _ in rows]
    table = pa.table(
        {
            "url": pa.array(urls, pa.string()),
            "caption": pa.array([f"caption of row {i}" for i in range(len(rows))], pa.string()),
            "similarity": pa.array([0.5 + i / 100 for i in range(len(rows))], pa.float64()),
            "license": pa.array([f"lic-{i}" for i in range(len(rows))], pa.string()),
        }
    )
    pq.write_table(table, path)


OPTIONS = {
    "image_size": 32,
    "resize_mode": "border",
    "min_image_size": 8,
    "encode_format": "jpg",
    "threads": 4,
    "timeout": TIMEOUT,
    "retries": 0,
    "mem_mb": 1000,  # scheduler-only keys must be accepted and ignored
    "runtime": 5,
}

# Expected status of each row, in order, per part: (url suffix or full URL, status).
PART_A = [
    ("/good0.png", "success"),
    ("/good1.jpg", "success"),
    ("/missing.jpg", "failed_to_download"),
    ("/corrupt.jpg", "failed_to_resize"),
    ("/page.html", "failed_to_resize"),
    ("/slow.jpg", "failed_to_download"),
    ("FILE_IMAGE", "rejected_scheme"),
    ("ftp://127.0.0.1/good0.png", "rejected_scheme"),
    ("/good2.png", "success"),
]
PART_B = [
    ("/good3.jpg", "success"),
    ("FIFO", "rejected_scheme"),
    ("/tiny.png", "failed_to_resize"),
    ("/noai.png", "failed_to_download"),
    ("data:image/png;base64,iVBORw0KGgo=", "rejected_scheme"),
    ("NO_SCHEME", "rejected_scheme"),
    ("/good4.png", "success"),
    ("/good5.jpg", "success"),
]


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    """Run the real CLI on two parts at once; return (out_dir, {part: expected statuses})."""
    root = tmp_path_factory.mktemp("download")
    readable_image = root / "local.png"
    readable_image.write_bytes(GOOD["/good0.png"][0])
    # Opening a FIFO for reading blocks until a writer appears (none will): had the downloader
    # opened this file:// URL, the run would hang and hit the timeout below.
    fifo = root / "never_read.fifo"
    os.mkfifo(fifo)
    host = server.removeprefix("http://")
    special = {
        "FILE_IMAGE": readable_image.as_uri(),
        "FIFO": fifo.as_uri(),
        "NO_SCHEME": f"{host}/good0.png",
    }

    def url(spec: str) -> str:
        return special.get(spec, server + spec if spec.startswith("/") else spec)

    out_dir = root / "shards"
    expected = {}
    procs = []
    for part, spec in (("00000", PART_A), ("00001", PART_B)):
        part_path = root / "parts" / f"{part}.parquet"
        part_path.parent.mkdir(exist_ok=True)
        write_part(part_path, [(url(s), "") for s, _ in spec])
        expected[part] = [status for _, status in spec]
        command = [sys.executable, "-m", "unicom.data.download", "--part", str(part_path)]
        command += ["--out-dir", str(out_dir), "--options-json", json.dumps(OPTIONS)]
        # One job per part here (shards_per_job 1): the job summary is named after the part.
        command += ["--summary", str(out_dir / f"{part}.summary.json")]
        procs.append(
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=scratch_env(root)
            )
        )
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()[-3000:]
    return out_dir, expected


def scratch_env(root: Path) -> dict[str, str]:
    """The environment with its own temporary folder, to see what the jobs leave there."""
    (root / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(root / "tmp")}


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_every_row_accounted_and_in_the_right_bucket(downloaded):
    out_dir, expected = downloaded
    for part, statuses in expected.items():
        (summary,) = json.loads((out_dir / f"{part}.summary.json").read_text())["parts"]
        assert summary["part"] == part
        assert summary["input_rows"] == len(statuses)
        assert sum(summary["counts"].values()) == len(statuses)
        assert summary["counts"] == dict(Counter(statuses))
        table = pq.read_table(out_dir / f"{part}.parquet")
        assert table.column("status").to_pylist() == statuses  # input order, row by row
        assert table.column("key").to_pylist() == [
            global_key(part, f"{row:09d}") for row in range(len(statuses))
        ]
        stats = summary["img2dataset"]
        assert stats["successes"] == summary["counts"]["success"]
        assert stats["count"] == len(statuses) - summary["counts"]["rejected_scheme"]


def test_failure_reasons(downloaded):
    out_dir, _ = downloaded
    a = pq.read_table(out_dir / "00000.parquet").to_pylist()
    assert "404" in a[2]["error_message"]
    assert a[3]["error_message"] == a[4]["error_message"] == "Image decoding error"
    assert "timed out" in a[5]["error_message"]
    assert "'file'" in a[6]["error_message"] and "'ftp'" in a[7]["error_message"]
    b = pq.read_table(out_dir / "00001.parquet").to_pylist()
    assert b[2]["error_message"] == "image too small"
    assert "X-Robots-Tag" in b[3]["error_message"]
    assert "'data'" in b[4]["error_message"] and "missing" in b[5]["error_message"]
    (summary,) = json.loads((out_dir / "00000.summary.json").read_text())["parts"]
    assert summary["errors"]["Image decoding error"] == 2
    assert "success" not in summary["errors"]


def test_each_real_failure_message_has_its_kind(downloaded):
    """What the success-rate floor reads: img2dataset's own messages, as it wrote them here."""
    out_dir, _ = downloaded
    rows = [row for part in ("00000", "00001") for row in pq.read_table(out_dir / f"{part}.parquet").to_pylist()]  # fmt: skip
    kinds = [error_kind(row["error_message"]) for row in rows if row["status"] != "success"]
    assert kinds == [
        "http", "decode", "decode", "timeout", "scheme", "scheme",  # part A
        "scheme", "decode", "robots", "scheme", "scheme",  # part B
    ]  # fmt: skip


def test_a_job_below_the_floor_stops_with_the_cause(server, tmp_path):
    """Every URL of the first part answers 404: the job stops there, before its second part,
    with one line naming the HTTP code; it writes no job summary."""
    parts = [tmp_path / "00020.parquet", tmp_path / "00021.parquet"]
    write_part(parts[0], [(f"{server}/gone{i}.jpg", "") for i in range(3)])
    write_part(parts[1], [(f"{server}/good0.png", "")])
    out = tmp_path / "out"
    with pytest.raises(UnicomError) as info:
        download_parts(parts, out, tmp_path / "job.json", OPTIONS, min_success_rate=0.2)
    assert str(info.value) == (
        "download part 00020: 0 of 3 rows downloaded (0.0 %), below download.min_success_rate "
        "0.2; likely cause: 3 HTTP errors, commonest HTTP 404 (3 rows): the links are gone "
        "(an old URL list?)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["00020.parquet", "00020.tar"]
    assert not (tmp_path / "job.json").exists()


def test_tar_holds_exactly_the_successes_with_unique_keys(downloaded):
    out_dir, expected = downloaded
    all_keys = []
    for part in expected:
        table = pq.read_table(out_dir / f"{part}.parquet").to_pylist()
        successes = {row["key"]: row for row in table if row["status"] == "success"}
        members = read_tar(out_dir / f"{part}.tar")
        assert list(members) == sorted(members)  # input row order, whatever finished first
        keys = {name.partition(".")[0] for name in members}
        assert keys == set(successes)
        assert set(members) == {f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")}
        for key, row in successes.items():
            meta = json.loads(members[f"{key}.json"])
            assert meta["key"] == key and "unicom_row" not in meta
            assert meta["similarity"] == row["similarity"] and meta["license"] == row["license"]
            assert members[f"{key}.txt"].decode() == row["caption"]
            image = Image.open(io.BytesIO(members[f"{key}.jpg"]))
            assert image.format == "JPEG" and image.size == (32, 32)
        all_keys += keys
    assert len(all_keys) == len(set(all_keys)) == 3 + 3


def test_extra_columns_carried_and_rejected_rows_kept(downloaded):
    out_dir, _ = downloaded
    table = pq.read_table(out_dir / "00000.parquet")
    assert table.column_names[:7] == [
        "key", "status", "error_message", "url", "caption", "similarity", "license",
    ]  # fmt: skip
    assert table.schema.field("similarity").type == pa.float64()
    rows = table.to_pylist()
    assert [r["license"] for r in rows] == [f"lic-{i}" for i in range(len(rows))]
    assert rows[6]["url"].startswith("file://") and rows[6]["width"] is None
    assert rows[0]["width"] == 32 and rows[0]["original_width"] == 40


def test_no_leftovers(downloaded):
    out_dir, expected = downloaded
    wanted = {f"{p}{s}" for p in expected for s in (".tar", ".parquet", ".summary.json")}
    assert {p.name for p in out_dir.iterdir()} == wanted  # no .work, no temp files
    # nor in $TMPDIR: img2dataset's processes import wandb, which makes two folders there
    # that they never remove (thousands on a LAION run's nodes)
    assert sorted(p.name for p in (out_dir.parent / "tmp").iterdir()) == []


def test_a_download_ends_with_its_scheduler_and_takes_img2dataset_along(server, tmp_path):
    """The download job of a Snakemake that was SIGKILLed (unicom.watchdog): img2dataset's
    spawned pool and logger end with it, before any output is written."""
    part = tmp_path / "00000.parquet"
    write_part(part, [(f"{server}/stall{i}.jpg", "") for i in range(8)])
    options = {**OPTIONS, "timeout": 60}
    command = [sys.executable, "-m", "unicom.data.download", "--part", str(part)]
    command += ["--out-dir", str(tmp_path / "shards"), "--options-json", json.dumps(options)]
    command += ["--summary", str(tmp_path / "summary.json")]
    scheduler = subprocess.Popen(["sleep", "600"])
    stage = subprocess.Popen(
        command, env={**os.environ, **scheduler_env(scheduler)}, stderr=subprocess.PIPE, text=True
    )
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2:  # img2dataset's pool worker and its logger, at least
            assert stage.poll() is None and time.monotonic() < deadline, stage.communicate()
            time.sleep(0.2)
            workers = psutil.Process(stage.pid).children(recursive=True)
        scheduler.kill()
        stage.wait(timeout=20)
        deadline = time.monotonic() + 10
        while not all(gone(w.pid) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [w.pid for w in workers if not gone(w.pid)] == []
    finally:
        for process in (scheduler, stage):
            process.kill()
            process.wait()
        for worker in workers:
            if not gone(worker.pid):
                worker.kill()
    assert stage.returncode == -signal.SIGTERM, stage.stderr.read()[-2000:]
    assert not (tmp_path / "shards/00000.tar").exists()


def test_no_allowed_row_gives_valid_empty_outputs(tmp_path):
    part = tmp_path / "00007.parquet"
    write_part(part, [("ftp://example.org/a.jpg", ""), ("file:///etc/passwd", "")])
    summary = download_part(part, tmp_path / "out", {"allowed_schemes": ["https"]})
    assert summary["counts"] == {"rejected_scheme": 2}
    assert read_tar(tmp_path / "out" / "00007.tar") == {}
    table = pq.read_table(tmp_path / "out" / "00007.parquet")
    assert table.num_rows == 2 and table.schema == output_schema(pq.read_schema(part))
    assert summary["img2dataset"]["count"] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00007.parquet", "00007.tar"]


def test_a_job_downloads_its_parts_in_turn_and_summarizes_them_once(tmp_path):
    parts = []
    for name in ("00010", "00011"):
        parts.append(tmp_path / f"{name}.parquet")
        write_part(parts[-1], [("ftp://example.org/a.jpg", "")])
    summaries = download_parts(parts, tmp_path / "out", tmp_path / "job.json", {})
    assert [s["part"] for s in summaries] == ["00010", "00011"]
    assert json.loads((tmp_path / "job.json").read_text()) == {"parts": summaries}
    with pytest.raises(UnicomError, match="given twice"):
        download_parts([parts[0], parts[0]], tmp_path / "out", tmp_path / "again.json", {})


def test_rejection_reason_and_partition():
    allowed = ["http", "https"]
    urls = [
        "http://a/x.jpg",
        "HTTPS://a/y",
        "file:///x",
        "ftp://a/b",
        "data:,x",
        "a/b.jpg",
        None,
        "",
    ]
    assert partition_by_scheme(urls, allowed) == [True, True] + [False] * 6
    assert "'file'" in rejection_reason("file:///x", allowed)
    assert rejection_reason("http://[::1", allowed) == "unparsable URL"
    assert rejection_reason(None, allowed) == "empty URL"
    assert partition_by_scheme(["file:///x"], ["file"]) == [True]


def test_summarize_and_merge_refuse_to_lose_rows():
    table = pa.table({"status": ["success", "failed_to_download"], "error_message": [None, "404"]})
    assert summarize("p", table, 2, 1.0)["counts"] == {"failed_to_download": 1, "success": 1}
    with pytest.raises(RuntimeError, match="add up to 2, not 3"):
        summarize("p", table, 3, 1.0)
    schema = output_schema(pa.schema([("url", pa.string()), ("caption", pa.string())]))
    row = {name: [None] for name in schema.names} | {"unicom_row": [0]}
    one_row = pa.table(row, schema=schema.append(pa.field("unicom_row", pa.int64())))
    with pytest.raises(RuntimeError, match=r"missing \[1\]"):
        merge_rows(schema, [one_row], 2)
    with pytest.raises(RuntimeError, match=r"duplicated \[0\]"):
        merge_rows(schema, [one_row, one_row], 1)


def test_rewrite_tar_keys(tmp_path):
    src = tmp_path / "src.tar"
    write_tar(src, [("000.jpg", b"img"), ("000.json", b'{"key": "000", "x": 1}')])
    keys = rewrite_tar_keys(src, tmp_path / "dst.tar", {"000": "p_007"}, ["x"])
    assert keys == {"p_007"}
    members = read_tar(tmp_path / "dst.tar")
    assert members["p_007.jpg"] == b"img" and json.loads(members["p_007.json"]) == {"key": "p_007"}
    with pytest.raises(RuntimeError, match="has no row"):
        rewrite_tar_keys(src, tmp_path / "bad.tar", {"999": "p_1"})


def test_rewrite_tar_keys_writes_samples_in_row_order(tmp_path):
    """img2dataset's threads write samples as their downloads finish; the shard must not depend
    on that order (the embeddings, the k-means sample and the training follow it)."""
    src = tmp_path / "src.tar"
    finished = [("002", "txt"), ("000", "jpg"), ("002", "jpg"), ("001", "jpg"), ("000", "txt")]
    write_tar(src, [(f"{key}.{ext}", f"{key}.{ext}".encode()) for key, ext in finished])
    new_keys = {"000": "p_000000000", "001": "p_000000001", "002": "p_000000002"}
    rewrite_tar_keys(src, tmp_path / "dst.tar", new_keys)
    members = read_tar(tmp_path / "dst.tar")
    assert list(members) == [
        "p_000000000.jpg",
        "p_000000000.txt",
        "p_000000001.jpg",
        "p_000000002.jpg",
        "p_000000002.txt",
    ]
    assert members["p_000000002.txt"] == b"002.txt"


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(UnicomError, match="config key download.thread_count: unknown key"):
        section_options("download", {"thread_count": 3})
    with pytest.raises(SystemExit) as exit_info:
        run_cli(__import__("unicom.data.download").data.download.main, ["--part", str(tmp_path / "x.parquet"),
                "--out-dir", str(tmp_path), "--summary", str(tmp_path / "s.json"),
                "--options-json", "{}"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "x.parquet: file not found" in err


def test_work_dir_reused_only_for_the_same_input(tmp_path):
    work = tmp_path / ".work" / "00000"
    first = pa.table({"url": ["http://a/1.jpg"], "unicom_row": [0]})
    prepare_work_dir(work, first)
    (work / "img2dataset").mkdir()
    prepare_work_dir(work, first)
    assert (work / "img2dataset").is_dir()  # same input: img2dataset may resume its shard
    prepare_work_dir(work, pa.table({"url": ["http://a/2.jpg"], "unicom_row": [0]}))
    assert not (work / "img2dataset").exists()  # different input: the old attempt is discarded
    assert pq.read_table(work / "input.parquet").column("url").to_pylist() == ["http://a/2.jpg"]
