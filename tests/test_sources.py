"""Existing shards and precomputed embeddings as inputs: the parse-time checks (unicom.sources),
the link of a shard's rows (unicom.data.existing) and the placing, joining and checking of
precomputed vectors (unicom.embed.locate / precomputed), on small real files.

The clip-retrieval fixture (tests/fixtures/clip_retrieval/) is the real tool's output for the
shards tests/existing_shards.py builds; the end-to-end runs are in test_sources_workflow.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicom import sources
from unicom.config import check_data_sources, layered_config
from unicom.data import existing
from unicom.embed import locate, precomputed
from unicom.errors import UnicomError
from unicom.shards import image_bytes, sample_members, write_tar

from helpers import REPO

FIXTURE = REPO / "tests/fixtures/clip_retrieval"


def shard(path: Path, keys: list[str], meta: bool = True) -> Path:
    members = []
    for i, key in enumerate(keys):
        url = {"url": f"http://x/{key}.jpg"} if meta else None
        members += sample_members(key, image_bytes((i * 40, 90, 200)), f"caption {key}", url)
    write_tar(path, members)
    return path


def status_table(path: Path, rows: dict[str, str]) -> None:
    pq.write_table(
        pa.table(
            {
                "url": [f"http://x/{k}.jpg" for k in rows],
                "caption": [f"caption {k}" for k in rows],
                "key": list(rows),
                "status": list(rows.values()),
                "error_message": [None if s == "success" else "HTTP 404" for s in rows.values()],
                "similarity": [0.3] * len(rows),
            }
        ),
        path,
    )


@pytest.fixture
def embeddings(tmp_path) -> Path:
    folder = tmp_path / "embeddings"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("*.sh", "*.md"))
    return folder


# --------------------------------------------------------------------------- the config


def config(**data) -> dict:
    base = {"demo": {"enabled": False}, "dedup": {"urls": False}, "data": data}
    return layered_config([], base)


@pytest.mark.parametrize(
    ("data", "dedup_urls", "message"),
    [
        (
            {"shards": ["a/*.tar"], "url_list": ["u.parquet"]},
            False,
            "config key data.shards: give data.url_list (to download) or data.shards",
        ),
        (
            {"url_list": ["u.parquet"], "embeddings": "emb"},
            False,
            "config key data.embeddings: needs data.shards",
        ),
        ({"shards": ["a/*.tar"]}, True, "config key dedup.urls: marks repeated URLs"),
    ],
)
def test_combinations_that_mean_nothing_are_one_line(data, dedup_urls, message):
    with pytest.raises(UnicomError, match="^" + re.escape(message)) as error:
        layered_config(
            [], {"demo": {"enabled": False}, "dedup": {"urls": dedup_urls}, "data": data}
        )
    assert "\n" not in str(error.value)


def test_shards_alone_are_a_run():
    check_data_sources(config(shards=["a/*.tar"], embeddings="emb"))


# --------------------------------------------------------------------------- shards


def test_shard_files_keep_the_patterns_order_and_sort_each(tmp_path):
    for name in ("b/00001.tar", "b/00000.tar", "a/x.tar"):
        shard(tmp_path / name, [f"{name[-5]}0"])
    files = sources.shard_files([str(tmp_path / "b/*.tar"), str(tmp_path / "a/*.tar")])
    assert [Path(f).relative_to(tmp_path).as_posix() for f in files] == [
        "b/00000.tar", "b/00001.tar", "a/x.tar"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        (["nothing/*.tar"], "no file matches"),
        (["a/*"], "which is not a .tar file"),
        (["a/*.tar", "a/0*.tar"], "is matched twice"),
    ],
)
def test_bad_shard_patterns_are_one_line(tmp_path, patterns, message):
    shard(tmp_path / "a/00000.tar", ["k0"])
    status_table(tmp_path / "a/00000.parquet", {"k0": "success"})
    with pytest.raises(UnicomError, match="^config key data.shards: .*" + message):
        sources.shard_files([str(tmp_path / p) for p in patterns])


def test_max_rows_takes_whole_shards_and_the_parts_pad_a_batch(tmp_path):
    files = [str(shard(tmp_path / f"{i}.tar", [f"{i}{j}" for j in range(4)])) for i in range(5)]
    assert sources.shards_taken(files, None) == (5, None)
    assert sources.shards_taken(files, 5) == (2, 8)  # the first shard holds 4: a second one
    assert sources.shards_taken(files, 100) == (5, 20)
    assert sources.shards_taken(files, 1, ranks=3) == (3, 12)  # a shard for every rank
    assert sources.padded_parts(2, 10) == [f"{i:05d}" for i in range(10)]
    assert sources.padded_parts(11, 10)[-1] == "00019"


def test_the_first_table_must_hold_the_columns_the_config_reads(tmp_path):
    tar = shard(tmp_path / "00000.tar", ["k0"])
    status_table(tmp_path / "00000.parquet", {"k0": "success"})
    plain = {"data": {"extra_cols": ["similarity"]}, "dedup": {"content": False}}
    sources.check_shard_tables([str(tar)], plain)
    with pytest.raises(UnicomError, match="^config key dedup.content: column 'sha256' is not in"):
        sources.check_shard_tables([str(tar)], {**plain, "dedup": {"content": True}})
    with pytest.raises(UnicomError, match="^config key data.extra_cols: column 'NSFW'"):
        sources.check_shard_tables([str(tar)], {**plain, "data": {"extra_cols": ["NSFW"]}})


# --------------------------------------------------------------------------- link


def test_link_accounts_for_every_row_and_sample(tmp_path):
    # the table: k0 ok, k1 failed, k2 says success but is not in the tar; the tar has k3 too
    source = shard(tmp_path / "in/00000.tar", ["k0", "k3"])
    status_table(tmp_path / "in/00000.parquet", {"k0": "success", "k1": "failed_to_download",
                                                 "k2": "success"})  # fmt: skip
    bare = shard(tmp_path / "in/00001.tar", ["m0", "m1"])  # no table: every sample a success
    out = tmp_path / "shards"
    summaries = existing.link_parts(
        ["00000", "00001", "00002"], [str(source), str(bare), existing.NO_SOURCE], str(out),
        str(out / "0000.summary.json"),
    )  # fmt: skip
    assert (out / "00000.tar").resolve() == source and (out / "00001.tar").is_symlink()
    first = pq.read_table(out / "00000.parquet")
    assert dict(zip(first["key"].to_pylist(), first["status"].to_pylist(), strict=True)) == {
        "k0": "success", "k1": "failed_to_download", "k2": "missing_from_shard", "k3": "success"
    }  # fmt: skip
    assert first["url"].to_pylist()[-1] == "http://x/k3.jpg"  # read from the sample's .json
    assert first["similarity"].to_pylist()[:3] == [0.3] * 3
    assert summaries[0]["counts"] == {"failed_to_download": 1, "missing_from_shard": 1,
                                      "success": 2}  # fmt: skip
    assert summaries[0]["keys"] == ["k0", "k3"] and summaries[0]["not_in_table"] == 1
    assert summaries[1]["counts"] == {"success": 2} and summaries[1]["table"] is None
    # the padding part: an empty tar (a real file) and a table with the same columns
    assert not (out / "00002.tar").is_symlink() and summaries[2]["input_rows"] == 0
    padding = pq.read_table(out / "00002.parquet")
    assert padding.num_rows == 0 and padding.schema.names == first.schema.names
    assert json.loads((out / "0000.summary.json").read_text())["parts"] == summaries


def test_a_key_twice_in_a_status_table_is_an_error(tmp_path):
    source = shard(tmp_path / "in/00000.tar", ["k0"])
    pq.write_table(pa.table({"key": ["k0", "k0"], "status": ["success"] * 2}),
                   tmp_path / "in/00000.parquet")  # fmt: skip
    with pytest.raises(UnicomError, match="key 'k0' is in the status table twice"):
        existing.link_parts(["00000"], [str(source)], str(tmp_path / "out"), str(tmp_path / "s"))


def test_the_run_may_not_link_its_own_shards(tmp_path):
    tar = shard(tmp_path / "results/shards/00000.tar", ["k0"])
    with pytest.raises(UnicomError, match="in this run's own shards folder"):
        sources.check_outside_run([str(tar.resolve())], str(tmp_path / "results/shards"))


# --------------------------------------------------------------------------- embeddings


def test_the_fixture_reads_as_clip_retrieval_wrote_it(embeddings):
    files = sources.embedding_files(str(embeddings))
    assert [(f.number, f.rows, f.image_dim, f.text_dim) for f in files] == [
        (0, 14, 512, 512), (1, 10, 512, 512)
    ]  # fmt: skip
    sources.check_dims(files, sources.expected_dims(open_clip("ViT-B-32")), "ViT-B-32")
    with pytest.raises(UnicomError, match="holds 512-dimensional vectors, but ViT-L-14 gives 768"):
        sources.check_dims(files, sources.expected_dims(open_clip("ViT-L-14")), "ViT-L-14")


def open_clip(model: str) -> dict:
    return {"encoder": "open_clip", "open_clip": {"model": model}}


def test_rows_that_differ_from_their_metadata_are_one_line(embeddings):
    text = embeddings / "text_emb/text_emb_1.npy"
    np.save(text, np.load(text)[:-1])
    with pytest.raises(
        UnicomError, match=r"text_emb_1.npy holds 9 rows but .*metadata_1.parquet 10"
    ):
        sources.embedding_files(str(embeddings))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "img_emb/img_emb_1.npy").unlink(), "has no image file of number 1"),
        (lambda f: shutil.rmtree(f / "text_emb"), "has no text_emb/ folder"),
        (
            lambda f: pq.write_table(pa.table({"path": ["x"]}), f / "metadata/metadata_0.parquet"),
            "has no 'image_path' column",
        ),
        (lambda f: np.save(f / "img_emb/img_emb_0.npy", np.zeros(3)), "not a 2-D float matrix"),
    ],
)
def test_broken_layouts_are_one_line(embeddings, damage, message):
    damage(embeddings)
    with pytest.raises(UnicomError, match="^config key data.embeddings: .*" + message):
        sources.embedding_files(str(embeddings))


def test_keys_are_placed_in_the_shard_whose_range_holds_them():
    ranges = sources.key_ranges(
        [{"part": "00001", "keys": ["000010", "000019"]}, {"part": "00000",
         "keys": ["000000", "000009"]}, {"part": "00002", "keys": None}]
    )  # fmt: skip
    parts, firsts, lasts = sources.range_arrays(ranges)
    assert parts == ["00000", "00001"]
    placed = locate.place_keys(["000003", "000015", "000009x", "000020", "00"], firsts, lasts)
    assert placed.tolist() == [0, 1, -1, -1, -1]


def test_a_file_whose_keys_miss_every_shard_is_not_read():
    # the first shard only (a rehearsal): metadata_1 holds shard 00001's keys, and its footer
    # statistics say so
    parts, firsts, lasts = sources.range_arrays(
        [{"part": "00000", "first": "000000", "last": "000009"}]
    )
    misses = [locate.misses_every_range(str(FIXTURE / f"metadata/metadata_{n}.parquet"), firsts,
              lasts) for n in (0, 1)]  # fmt: skip
    assert misses == [False, True]


def test_interleaving_key_ranges_are_refused():
    with pytest.raises(
        UnicomError,
        match=r"^config key data.shards: the keys of x.tar \(a0..a9\) and y.tar \(a5..b0\) interleave",
    ):
        sources.key_ranges([{"part": "00000", "keys": ["a0", "a9"], "source": "x.tar"},
                           {"part": "00001", "keys": ["a5", "b0"], "source": "y.tar"}])  # fmt: skip


def test_vectors_are_checked_and_normalised_once():
    image = np.array([[0.6, 0.8], [3.0, 4.0], [np.nan, 1.0], [0.0, 0.0]], np.float16)
    text = np.array([[1.0, 0.0]] * 4, np.float16)
    image_out, text_out, reasons, normalised = precomputed.check_vectors(image, text)
    assert reasons == [None, None, precomputed.NON_FINITE, precomputed.ZERO]
    assert normalised == 1 and np.allclose(image_out[1], [0.6, 0.8])
    assert np.array_equal(image_out[0], image[0].astype(np.float32))  # unit already: as given


def test_a_key_given_twice_keeps_its_first_row():
    located = pa.table({"key": ["b", "a", "a", "z"], "number": [1, 1, 0, 0], "row": [0, 1, 5, 2]})
    where, counts = precomputed.match_rows(["a", "b", "c"], located)
    assert where == {"a": (0, 5), "b": (1, 0)}
    assert counts == {"matched": 2, "repeated_key": 1, "no_sample": 1}


def test_rows_without_a_sample_above_the_threshold_stop_the_run():
    index = {"folder": "f", "rows": 24, "shards_left_out": 0,
             "files": [{"placed": 19, "outside": 5}]}  # fmt: skip
    batch = {"parts": {"00000": {"matched": 19, "repeated_key": 0, "no_sample": 0}}}
    summary = precomputed.summarize(index, [batch], 0.5)
    assert summary["embedding_rows"]["no_sample"] == 5
    with pytest.raises(UnicomError, match=r"5 of 24 embedding rows \(20.8%\) have no sample"):
        precomputed.summarize(index, [batch], 0.01)
    # with data.max_rows the rows outside the shards taken are left out, not missing
    taken = precomputed.summarize({**index, "shards_left_out": 2}, [batch], 0.0)
    assert taken["embedding_rows"]["outside_the_shards_taken"] == 5
