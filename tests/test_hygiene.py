"""Data hygiene units: exact dedup at scale (hash buckets on disk), URL normalisation and the
split's duplicate_of, download's duplicate_url rows, the screen (content dedup + metadata
filters), SemDeDup within a cluster, scatter/dedup by cluster group, and the accounting."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicom import drops, duplicates
from unicom.config import layered_config
from unicom.data.download import skip_reasons
from unicom.data.split_urls import split_url_lists
from unicom.errors import UnicomError
from unicom.formats import embedding_array
from unicom.hygiene import near, report, screen

from helpers import REPO

DEMO = str(REPO / "config/config.yaml")


def reference_duplicates(values: list) -> dict[int, int]:
    """Row -> first row with the same value (the obvious in-memory way)."""
    first: dict = {}
    result = {}
    for row, value in enumerate(values):
        if value in (None, ""):
            continue
        if value in first:
            result[row] = first[value]
        else:
            first[value] = row
    return result


def test_external_dedup_matches_the_in_memory_answer_across_buckets(tmp_path):
    rng = np.random.default_rng(0)
    values = [f"v{int(v)}" for v in rng.integers(0, 400, 3000)] + ["", None, "", None]
    array = pa.array(values, pa.string())
    hashes = duplicates.hash64(array)

    def replay():
        for start in range(0, len(values), 257):  # batches that straddle the buckets
            yield hashes[start : start + 257], array.slice(start, 257)

    found = duplicates.dedup_stream(replay, tmp_path / "work", len(values), bucket_rows=256)
    assert duplicates.bucket_bits(len(values), 256) == 4  # 16 buckets were used
    assert found.twin_of() == reference_duplicates(values)
    assert list(found.rows) == sorted(found.rows) and found.collisions == 0
    assert not (tmp_path / "work").exists()  # the scratch files are gone


def test_a_hash_collision_is_compared_on_the_value():
    hashes = np.array([7, 7, 7, 9, 7], np.uint64)  # four rows share a hash, two values
    rows, firsts, collisions = duplicates.first_occurrences(
        hashes, np.arange(5), ["a", "b", "a", "c", "b"]
    )
    assert rows.tolist() == [2, 4] and firsts.tolist() == [0, 1] and collisions == 1


def test_url_normalisation_lowers_scheme_and_host_only():
    urls = pa.array(
        ["HTTP://Ex.COM/A?q=B", " http://ex.com/A?q=B ", "http://U:P@EX.com/a", "x y", None]
    )
    assert duplicates.normalize_urls(urls).to_pylist() == [
        "http://ex.com/A?q=B",
        "http://ex.com/A?q=B",
        "http://U:P@ex.com/a",
        "x y",
        None,
    ]


def url_file(path, urls):
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"t{i}" for i in range(len(urls))]}), path)
    return path


def test_split_marks_every_later_copy_of_a_url_across_files(tmp_path):
    first = url_file(
        tmp_path / "a.parquet",
        [
            "https://x.org/1.jpg",
            "https://x.org/2.jpg",
            "HTTPS://X.ORG/1.jpg",
            "https://x.org/3.jpg",
        ],
    )
    second = url_file(
        tmp_path / "b.parquet",
        ["https://x.org/2.jpg", "https://x.org/1.jpg", "https://x.org/1.JPG"],
    )
    manifest = split_url_lists(
        [first, second], tmp_path / "parts", 3, "URL", "TEXT", dedup_urls=True
    )
    column = [
        value
        for part in manifest["parts"]
        for value in pq.read_table(tmp_path / "parts" / f"{part}.parquet")[
            "duplicate_of"
        ].to_pylist()
    ]
    # 7 rows in 3 parts of 3, 2, 2: keys are part_row. The path keeps its case (1.JPG is new).
    assert column == [None, None, "00000_000000000", None, "00000_000000001",
                      "00000_000000000", None]  # fmt: skip
    assert manifest["url_dedup"]["duplicates"] == 3
    assert not (tmp_path / "parts" / ".dedup").exists()


def test_split_without_dedup_has_no_duplicate_column(tmp_path):
    path = url_file(tmp_path / "a.parquet", ["https://x.org/1.jpg"] * 2)
    manifest = split_url_lists([path], tmp_path / "parts", 5, "URL", "TEXT")
    assert "duplicate_of" not in pq.read_schema(tmp_path / "parts/00000.parquet").names
    assert manifest["url_dedup"] == {"enabled": False}


def test_download_skips_repeated_urls_but_rejects_bad_schemes_first():
    reasons = skip_reasons(
        ["https://a/1", "https://a/1", "file:///etc/passwd", None],
        [None, "00000_000000000", "00000_000000000", None],
        ["http", "https"],
    )
    assert reasons[0] is None
    assert reasons[1] == ("duplicate_url", "same URL as 00000_000000000")
    assert reasons[2][0] == "rejected_scheme" and reasons[3] == ("rejected_scheme", "empty URL")


def shard_table(path, part, sha, widths, nsfw):
    rows = len(sha)
    pq.write_table(
        pa.table(
            {
                "key": [f"{part}_{i:09d}" for i in range(rows)] + [f"{part}_{rows:09d}"],
                "status": ["success"] * rows + ["failed_to_download"],
                "sha256": [h * 64 for h in sha] + [None],
                "original_width": widths + [None],
                "original_height": [100] * rows + [None],
                "NSFW": nsfw + [None],
            }
        ),
        path,
    )
    return str(path)


def test_screen_filters_first_then_drops_repeated_bytes_in_row_order(tmp_path):
    tables = [
        shard_table(tmp_path / "00000.parquet", "00000", "abca", [50, 50, 10, 50],
                    ["UNLIKELY", "NSFW", "UNLIKELY", None]),
        shard_table(tmp_path / "00001.parquet", "00001", "bad", [50, 50, 50],
                    ["UNLIKELY", "UNLIKELY", "UNLIKELY"]),
    ]  # fmt: skip
    options = {
        "content": True,
        "filters": {"min_width": 20, "columns": [{"column": "NSFW", "op": "!=", "value": "NSFW"}]},
    }
    summary = screen.screen(
        tables, str(tmp_path / "s.parquet"), str(tmp_path / "s.json"), options, str(tmp_path / "w")
    )
    result = pq.read_table(tmp_path / "s.parquet").to_pylist()
    by_key = {row["key"]: (row["reason"], row["twin"] or row["detail"]) for row in result}
    assert by_key == {
        "00000_000000001": ("filtered", "NSFW != 'NSFW'"),
        "00000_000000002": ("filtered", "original_width < 20"),
        "00000_000000003": ("duplicate_content", "00000_000000000"),  # null NSFW passes !=
        # part 1's b is kept: the earlier b was filtered, so it is the first b that counts
        "00001_000000001": ("duplicate_content", "00000_000000000"),
    }
    assert summary["successes_examined"] == 7 and summary["kept"] == 3
    assert summary["dropped"] == {"duplicate_content": 2, "filtered": 2}


@pytest.mark.parametrize(
    ("rule", "values", "passed"),
    [
        ({"op": "==", "value": "a"}, ["a", "b", None], [True, False, False]),
        ({"op": "not_in", "value": ["a"]}, ["a", "b", None], [False, True, True]),
        ({"op": ">=", "value": 0.3}, [0.2, 0.3, None], [False, True, False]),
    ],
)
def test_column_rules(rule, values, passed):
    assert screen.passes_rule(pa.array(values), {"column": "c", **rule}).tolist() == passed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"dedup": {"threshold": 1.5}}, "dedup.threshold: 1.5 is greater than the maximum of 1"),
        ({"dedup": {"threshold": 0}}, "dedup.threshold: 0 is less than or equal to the minimum"),
        (
            {"filters": {"columns": [{"column": "NSFW", "op": "!=", "value": "NSFW"}]}},
            r"filters.columns\[0\].column: 'NSFW' is not in data.extra_cols",
        ),
        (
            {"filters": {"columns": [{"column": "category", "op": "in", "value": "x"}]}},
            r"filters.columns\[0\].value: op in needs a list",
        ),
    ],
)
def test_bad_hygiene_config_is_one_line_naming_the_key(override, message):
    with pytest.raises(UnicomError, match=message) as info:
        layered_config([DEMO], override)
    assert "\n" not in str(info.value)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_semdedup_threshold_one_drops_nothing_and_lower_drops_a_superset():
    rng = np.random.default_rng(1)
    x = unit(rng.normal(size=(300, 8)))
    keys = [f"k{i:03d}" for i in range(len(x))]
    previous = np.zeros(len(x), bool)
    counts = []
    for threshold in (1.0, 0.99, 0.95, 0.9, 0.8, 0.6):
        dropped, twin, trigger, sim = near.semdedup(x, keys, threshold)
        assert (dropped >= previous).all()  # nested: lowering the threshold only adds drops
        assert (sim[dropped] > threshold).all() and not dropped[twin[dropped]].any()
        previous = dropped
        counts.append(int(dropped.sum()))
    assert counts[0] == 0 and counts[-1] > counts[2] > 0


def test_semdedup_keeps_the_least_typical_and_blocks_change_nothing(monkeypatch):
    rng = np.random.default_rng(2)
    base = unit(rng.normal(size=(40, 16)))
    copy = unit((base[5] + 0.01 * rng.normal(size=16))[None])[0]
    x = unit(np.vstack([base, copy[None]]))
    keys = [f"k{i:03d}" for i in range(len(x))]
    dropped, twin, _, sim = near.semdedup(x, keys, 0.99)
    assert np.flatnonzero(dropped).size == 1
    (gone,) = np.flatnonzero(dropped)
    assert {gone, twin[gone]} == {5, 40} and sim[gone] > 0.99
    mean = unit(x.mean(axis=0, keepdims=True))[0]
    assert x[twin[gone]] @ mean <= x[gone] @ mean  # the kept one is less typical
    monkeypatch.setattr(near, "BLOCK", 7)
    small = near.semdedup(x, keys, 0.99)
    assert (small[0] == dropped).all() and (small[1] == twin).all()


def test_scatter_and_dedup_by_group_find_pairs_within_clusters_only(tmp_path):
    rng = np.random.default_rng(3)
    vectors = unit(rng.normal(size=(12, 8)))
    vectors[7] = unit(vectors[2][None] + 0.001)[0]  # same cluster as 2: a near-duplicate
    vectors[9] = vectors[4]  # identical, but in another cluster: never compared
    labels = [0, 0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3]
    paths = []
    (tmp_path / "assign").mkdir()
    (tmp_path / "embed").mkdir()
    for part, rows in (("00000", range(6)), ("00001", range(6, 12))):
        keys = [f"{part}_{i:09d}" for i in rows]
        assignment, space = tmp_path / f"assign/{part}.parquet", tmp_path / f"embed/{part}.parquet"
        pq.write_table(pa.table({"key": keys, "label": [labels[i] for i in rows]}), assignment)
        # the embed file's rows in another order: rows are joined on the key
        embedded = embedding_array(vectors[list(rows)][::-1])
        pq.write_table(pa.table({"key": keys[::-1], "image_emb": embedded}), space)
        paths.append((str(assignment), str(space)))
    screened = tmp_path / "screened.parquet"
    drops.write(screened, drops.table([{"part": "00000", "key": "00000_000000003",
                                        "reason": "filtered"}]))  # fmt: skip
    options = {"threshold": 0.99, "space": "image"}
    for index, (assignment, space) in enumerate(paths):
        near.scatter([assignment], [space], str(screened), str(tmp_path / f"s{index}.parquet"),
                     {"space": "image"}, groups=2)  # fmt: skip
    scattered = [str(tmp_path / f"s{i}.parquet") for i in range(2)]
    assert sum(pq.read_metadata(p).num_rows for p in scattered) == 11  # the screened row is out
    found = {}
    for group in range(2):
        table, stats = near.dedup_group(scattered, group, options)
        assert stats["clusters"] == (2 if group == 0 else 2)
        found.update({r["key"]: r for r in table.to_pylist()})
    assert set(found) <= {"00000_000000002", "00001_000000007"} and len(found) == 1
    (row,) = found.values()
    assert {row["key"], row["twin"]} == {"00000_000000002", "00001_000000007"}
    assert row["similarity"] > 0.99 and row["detail"] == "cluster 0"


def test_accounting_adds_up_to_the_url_list():
    download = {"counts": {"success": 10, "duplicate_url": 2, "failed_to_download": 1},
                "input_rows": 13, "left_out_beyond_max_rows": 0}  # fmt: skip
    counts = report.accounting(download, {"near_duplicate": 3, "duplicate_content": 1})
    assert counts == {"kept": 6, "duplicate_content": 1, "near_duplicate": 3, "duplicate_url": 2,
                      "failed_to_download": 1}  # fmt: skip
    assert sum(counts.values()) == 13
    # a check that found nothing is still shown, as a 0
    checked = report.accounting(download, {}, ["duplicate_url", "duplicate_content", "filtered"])
    assert checked == {"kept": 10, "duplicate_content": 0, "filtered": 0, "duplicate_url": 2,
                       "failed_to_download": 1}  # fmt: skip


def test_clip_score_filter_uses_embeds_cosine_and_passes_rows_without_one():
    table = pa.table({"key": ["p_0", "p_1", "p_2"]})
    scores = pa.table({"key": ["p_1", "p_0"], "clip_score": pa.array([0.31, 0.2], pa.float32())})
    filters = {"clip_score_min": 0.3, "min_width": None, "min_height": None, "columns": []}
    assert screen.filter_reasons(table, filters, scores) == ["clip_score < 0.3", None, None]


def test_clip_score_filter_needs_one_clip_model():
    with pytest.raises(UnicomError, match="filters.clip_score_min: needs one CLIP model"):
        layered_config([DEMO], {"filters": {"clip_score_min": 0.3}})


def test_scatter_keeps_one_row_group_per_group_however_large(tmp_path):
    """A group above pyarrow's default row group (1,048,576 rows) must stay one row group:
    the dedup job reads exactly the one its index names."""
    rows = 1024 * 1024 + 5
    (tmp_path / "assign").mkdir()
    (tmp_path / "embed").mkdir()
    keys = pa.array([f"00000_{i:09d}" for i in range(rows)])
    labels = pa.array(np.zeros(rows, np.int32))
    pq.write_table(pa.table({"key": keys, "label": labels}), tmp_path / "assign/00000.parquet")
    vectors = unit(np.random.default_rng(4).normal(size=(rows, 2)))
    pq.write_table(
        pa.table({"key": keys, "image_emb": embedding_array(vectors)}),
        tmp_path / "embed/00000.parquet",
    )
    out = tmp_path / "s.parquet"
    stats = near.scatter(
        [str(tmp_path / "assign/00000.parquet")], [str(tmp_path / "embed/00000.parquet")],
        None, str(out), {"space": "image"}, groups=1,
    )  # fmt: skip
    assert stats == {"rows": rows, "skipped": 0}
    assert pq.ParquetFile(out).metadata.num_row_groups == 1
    assert near.read_group(str(out), 0).num_rows == rows
