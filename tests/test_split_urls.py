"""unicom.data.split_urls: parts, manifest, column renaming and one-line errors for bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicom.data.split_urls import check_url_list, chunk_rows, part_sizes, split_url_lists
from unicom.errors import UnicomError


def laion_file(path: Path, start: int, rows: int, row_group_size: int = 4) -> Path:
    """A LAION-like file: URL/TEXT plus extra columns, several row groups."""
    ids = list(range(start, start + rows))
    table = pa.table(
        {
            "SAMPLE_ID": pa.array(ids, pa.int64()),
            "URL": [f"https://example.org/{i}.jpg" for i in ids],
            "TEXT": [f"caption {i}" for i in ids],
            "similarity": [i / 100 for i in ids],
            "NSFW": ["UNLIKELY"] * rows,
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def two_inputs(tmp_path):
    return [laion_file(tmp_path / "a.parquet", 0, 7), laion_file(tmp_path / "b.parquet", 7, 6)]


def test_split_sizes_names_manifest_and_renaming(two_inputs, tmp_path):
    out = tmp_path / "parts"
    manifest = split_url_lists(two_inputs, out, 5, "URL", "TEXT", ["similarity", "SAMPLE_ID"])
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.parquet", "00001.parquet", "00002.parquet", "manifest.json",
    ]  # fmt: skip
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["parts"] == ["00000", "00001", "00002"]
    assert manifest["total_rows"] == 13
    assert [(Path(i["path"]).name, i["rows"]) for i in manifest["inputs"]] == [
        ("a.parquet", 7),
        ("b.parquet", 6),
    ]
    tables = [pq.read_table(out / f"{name}.parquet") for name in manifest["parts"]]
    assert [t.num_rows for t in tables] == [5, 4, 4]  # even, none above 5
    assert all(t.column_names == ["url", "caption", "similarity", "SAMPLE_ID"] for t in tables)
    joined = pa.concat_tables(tables)
    # Row order is kept across files and row groups; part 00001 spans both input files.
    assert joined.column("SAMPLE_ID").to_pylist() == list(range(13))
    assert joined.column("url").to_pylist()[8] == "https://example.org/8.jpg"
    assert joined.column("caption").to_pylist()[12] == "caption 12"
    assert joined.schema.field("similarity").type == pa.float64()


@pytest.mark.parametrize("inputs_first", [True, False])
def test_cli_replaces_the_folder_with_either_argument_order(two_inputs, tmp_path, inputs_first):
    out = tmp_path / "parts"
    (out / "stale").mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "unicom.data.split_urls",
        "--out-dir",
        str(out),
        "--shard-size",
    ]
    command += ["100", "--url-col", "URL", "--caption-col", "TEXT"]
    inputs = [str(p) for p in two_inputs]
    if inputs_first:
        command += [*inputs, "--extra-cols", "NSFW"]
    else:  # extra columns first: "--" ends their list
        command += ["--extra-cols", "NSFW", "--", *inputs]
    subprocess.run(command, check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "manifest.json"]
    assert pq.read_schema(out / "00000.parquet").names == ["url", "caption", "NSFW"]
    assert pq.read_metadata(out / "00000.parquet").num_rows == 13
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs


def test_chunk_rows():
    tables = [pa.table({"x": list(range(n))}) for n in (3, 0, 4)]
    groups = list(chunk_rows(iter(tables), [2, 2, 2, 1]))
    assert [sum(t.num_rows for t in g) for g in groups] == [2, 2, 2, 1]
    assert [x for t in groups[1] for x in t["x"].to_pylist()] == [2, 0]
    assert list(chunk_rows(iter([]), [])) == []
    with pytest.raises(UnicomError, match="more rows"):
        list(chunk_rows(iter(tables), [2, 2]))


@pytest.mark.parametrize(
    ("rows", "shard_size", "per_job", "sizes"),
    [
        (13, 5, 1, [5, 4, 4]),
        (12, 4, 1, [4, 4, 4]),
        (6194, 2000, 1, [1549, 1549, 1548, 1548]),
        (25, 5, 10, [3] * 5 + [2] * 5),  # 5 parts rounded up to one job of 10
        (10, 10, 10, [1] * 10),
    ],
)
def test_part_sizes_are_even_and_fill_whole_jobs(rows, shard_size, per_job, sizes):
    assert part_sizes(rows, shard_size, per_job) == sizes
    assert sum(sizes) == rows and max(sizes) <= shard_size and len(sizes) % per_job == 0


def test_part_sizes_errors_name_the_config_key():
    assert "download.shards_per_job" in one_line_error(lambda: part_sizes(10, 5, 3))
    assert "lower shards_per_job" in one_line_error(lambda: part_sizes(9, 5, 10))
    assert "download.shard_size" in one_line_error(lambda: part_sizes(9, 0, 1))


def test_split_with_ten_shards_per_job(two_inputs, tmp_path):
    manifest = split_url_lists(two_inputs, tmp_path / "p", 2, "URL", "TEXT", shards_per_job=10)
    assert manifest["parts"] == [f"0000{i}" for i in range(10)]
    assert manifest["shards_per_job"] == 10
    rows = [pq.read_metadata(tmp_path / f"p/{n}.parquet").num_rows for n in manifest["parts"]]
    assert rows == [2, 2, 2, 1, 1, 1, 1, 1, 1, 1]


def one_line_error(call) -> str:
    with pytest.raises(UnicomError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_column_names_column_file_and_key(two_inputs):
    message = one_line_error(lambda: check_url_list(two_inputs, "url", "TEXT", []))
    assert "'url'" in message and "a.parquet" in message and "data.url_col" in message
    message = one_line_error(lambda: check_url_list(two_inputs, "URL", "caption", []))
    assert "'caption'" in message and "data.caption_col" in message
    message = one_line_error(lambda: check_url_list(two_inputs, "URL", "TEXT", ["aesthetic"]))
    assert "'aesthetic'" in message and "data.extra_cols" in message


def test_reserved_extra_column(two_inputs):
    message = one_line_error(lambda: check_url_list(two_inputs, "URL", "TEXT", ["status"]))
    assert "'status'" in message and "data.extra_cols" in message


def test_empty_file(tmp_path, two_inputs):
    empty = laion_file(tmp_path / "empty.parquet", 0, 0)
    message = one_line_error(lambda: check_url_list([*two_inputs, empty], "URL", "TEXT", []))
    assert message.endswith("empty.parquet has no rows")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.parquet"
    message = one_line_error(lambda: check_url_list([missing], "URL", "TEXT", []))
    assert str(missing) in message and "not found" in message


def test_not_parquet(tmp_path):
    csv = tmp_path / "list.parquet"
    csv.write_text("URL,TEXT\nhttps://example.org/a.jpg,a\n")
    message = one_line_error(lambda: check_url_list([csv], "URL", "TEXT", []))
    assert "list.parquet" in message and "not a Parquet file" in message


def test_no_inputs():
    assert "data.url_list" in one_line_error(lambda: check_url_list([], "URL", "TEXT", []))


def test_check_returns_total_rows(two_inputs):
    assert check_url_list(two_inputs, "URL", "TEXT", ["NSFW"]) == 13


def test_cli_error_is_one_line_exit_2(tmp_path):
    command = [sys.executable, "-m", "unicom.data.split_urls", "--out-dir", str(tmp_path / "parts")]
    command += ["--shard-size", "10", str(tmp_path / "absent.parquet")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "absent.parquet" in result.stderr
    assert not (tmp_path / "parts").exists()
