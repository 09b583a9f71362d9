"""Embed stage: tar grouping, decoding failures, shard order, and the CLI end to end."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from unicom import formats
from unicom.cli import run_cli
from unicom.embed.embed import (
    EmbedResult,
    collate_samples,
    decode_sample,
    embed_shard,
    main,
    result_table,
    shard_batches,
)
from unicom.encoders import build_encoder
from unicom.errors import UnicomError
from unicom.shards import TarSample, group_tar_members, split_member_name
from unicom.synthetic import image_bytes, sample_members, write_tar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

CORRUPT_KEY = "00000_000000003"
DEMO_OPTIONS = {
    "encoder": "demo",
    "demo": {"image_size": 64},
    "batch_size": 2,
    "num_workers": 1,
    "device": "cpu",
    "threads": 1,
}


def write_shard(path: Path, count: int = 6, corrupt: str | None = CORRUPT_KEY) -> list[dict]:
    """img2dataset-like shard; sample ``corrupt`` has bytes that are not an image."""
    samples, members = [], []
    for i in range(count):
        key = f"00000_{i:09d}"
        caption = f"sample number {i} in colour {i * 40}"
        url = f"https://example.org/{i}.jpg"
        if key == corrupt:
            data, ext = b"\xff\xd8 this is not really a jpeg", "jpg"
        elif i == 1:
            data, ext = image_bytes((i * 40, 90, 200, 128), "PNG", mode="RGBA"), "png"
        else:
            data, ext = image_bytes((i * 40, 90, 200)), "jpg"
        meta = {"url": url, "caption": caption, "key": key, "status": "success"}
        members += sample_members(key, data, caption, meta, extension=ext)
        samples.append({"key": key, "caption": caption, "url": url})
    write_tar(path, members)
    return samples


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("shards") / "00000.tar"
    return path, write_shard(path)


@pytest.fixture(scope="module")
def demo_encoder():
    torch.set_num_threads(1)
    return build_encoder(DEMO_OPTIONS, torch.device("cpu"))


def test_split_and_group_members():
    assert split_member_name("00000_000000001.jpg") == ("00000_000000001", "jpg")
    assert split_member_name("a/b/key.seg.PNG") == ("a/b/key", "seg.png")
    members = [("k1.jpg", b"1"), ("k1.txt", b"t"), ("k2.jpg", b"2")]
    samples = list(group_tar_members(members))
    assert samples == [TarSample("k1", {"jpg": b"1", "txt": b"t"}), TarSample("k2", {"jpg": b"2"})]
    with pytest.raises(UnicomError, match="'k1' appears twice"):
        list(group_tar_members(members + [("k1.json", b"{}")], "x.tar"))
    with pytest.raises(UnicomError, match="two '.jpg' members"):
        list(group_tar_members([("k.jpg", b""), ("k.jpg", b"")]))


def test_decode_and_collate_record_failures():
    transform = lambda image: torch.zeros(3, 2, 2)  # noqa: E731
    good = decode_sample(TarSample("a", {"jpg": image_bytes((1, 2, 3)), "txt": b"cap"}), transform)
    bad = decode_sample(TarSample("b", {"jpg": b"garbage", "json": b'{"url": "u"}'}), transform)
    missing = decode_sample(TarSample("c", {"txt": b"only text"}), transform)
    assert good.error is None and good.caption == "cap" and good.url is None
    assert bad.image is None and bad.error.startswith("undecodable jpg") and bad.url == "u"
    assert missing.error == "no image member"
    batch = collate_samples([good, bad, missing])
    assert batch.keys == ["a"] and batch.images.shape == (1, 3, 2, 2)
    assert [key for key, _ in batch.skipped] == ["b", "c"]
    assert collate_samples([bad]).images is None


class FirstPixelRed:
    """Cheap picklable transform: enough to check ordering across workers."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.tensor([float(image.convert("RGB").getpixel((0, 0))[0])])


def test_batches_keep_shard_order_with_several_workers(tmp_path):
    path = tmp_path / "00001.tar"
    samples = write_shard(path, count=9, corrupt=None)
    batches = list(shard_batches(path, FirstPixelRed(), batch_size=2, num_workers=2))
    assert [len(b.keys) for b in batches] == [2, 2, 2, 2, 1]
    assert [k for b in batches for k in b.keys] == [s["key"] for s in samples]


def test_embed_shard_is_deterministic_and_worker_independent(shard, demo_encoder):
    path, samples = shard
    in_process = embed_shard(path, demo_encoder, batch_size=2, num_workers=0, show_progress=False)
    with_worker = embed_shard(path, demo_encoder, batch_size=2, num_workers=1, show_progress=False)
    good = [s for s in samples if s["key"] != CORRUPT_KEY]
    assert in_process.keys == [s["key"] for s in good]
    assert in_process.skipped[0][0] == CORRUPT_KEY and len(in_process.skipped) == 1
    assert np.array_equal(in_process.image_emb, with_worker.image_emb)
    assert np.array_equal(in_process.text_emb, with_worker.text_emb)
    # Different samples (colours) give different image embeddings.
    assert not np.array_equal(in_process.image_emb[0], in_process.image_emb[1])


@pytest.mark.parametrize("compressed", [False, True])
def test_broken_tar_is_one_line_error(tmp_path, demo_encoder, compressed):
    path = tmp_path / "broken.tar"
    write_shard(path, count=3, corrupt=None)
    data = gzip.compress(path.read_bytes()) if compressed else path.read_bytes()
    # Cut inside the archive: plain tars fail the header scan in the main process,
    # compressed ones inside the decoding worker.
    path.write_bytes(data[: len(data) // 2] if compressed else data[:700])
    with pytest.raises(UnicomError, match="not a readable tar shard") as err:
        embed_shard(path, demo_encoder, batch_size=2, num_workers=1, show_progress=False)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_empty_result_still_has_the_schema():
    empty = EmbedResult([], [], [], np.zeros((0, 8), np.float16), np.zeros((0, 4), np.float16), [])
    table = result_table(empty, {"shared_space": False})
    assert table.num_rows == 0
    assert table.schema.field("image_emb").type == pa.list_(pa.float16(), 8)


def test_cli_bad_options_are_one_line(shard, tmp_path, capsys):
    path, _ = shard
    args = ["--shard", str(path), "--out", str(tmp_path / "o.parquet")]
    args += ["--skipped", str(tmp_path / "s.csv"), "--options-json", '{"encoder": "clip"}']
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "config key embed.encoder: 'clip' is not one of" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.parquet").exists()


def test_cli_end_to_end(shard, tmp_path):
    path, samples = shard
    out, skipped = tmp_path / "embed" / "00000.parquet", tmp_path / "embed" / "00000.skipped.csv"
    command = [sys.executable, "-m", "unicom.embed.embed", "--shard", str(path), "--out", str(out)]
    command += ["--skipped", str(skipped), "--options-json", json.dumps(DEMO_OPTIONS)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "img/s" in done.stderr

    table = pq.read_table(out)
    good = [s for s in samples if s["key"] != CORRUPT_KEY]
    assert table.column_names == ["key", "caption", "url", "image_emb", "text_emb"]
    assert table["key"].to_pylist() == [s["key"] for s in good]
    assert table["caption"].to_pylist() == [s["caption"] for s in good]
    assert table["url"].to_pylist() == [s["url"] for s in good]
    assert table.schema.field("image_emb").type == pa.list_(pa.float16(), 1280)
    assert table.schema.field("text_emb").type == pa.list_(pa.float16(), 384)
    for column in ("image_emb", "text_emb"):
        norms = np.linalg.norm(formats.column_to_numpy(table[column]), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)

    identity = formats.read_metadata(str(out), formats.ENCODER_METADATA_KEY)
    assert identity["encoder"] == "demo" and identity["shared_space"] is False

    with open(skipped, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["key", "reason"]
    assert [row[0] for row in rows[1:]] == [CORRUPT_KEY]
    assert "undecodable jpg" in rows[1][1]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_one_clip_model_adds_the_image_caption_cosine():
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    result = EmbedResult(["a", "b", "c"], ["x"] * 3, [None] * 3, image.astype(np.float16),
                         text.astype(np.float16), [])  # fmt: skip
    shared = result_table(result, {"shared_space": True})
    expected = (image * text).sum(axis=1)
    assert np.allclose(shared["clip_score"].to_numpy(), expected, atol=2e-3)
    assert "clip_score" not in result_table(result, {"shared_space": False}).column_names


def write_photo_shard(path: Path, count: int, cut: str | None = None) -> list[str]:
    """Photo-like JPEGs, a PNG with transparency among them; ``cut``: that key's JPEG ends
    after its headers (every decoder refuses it, but its header reads fine)."""
    from unicom.synthetic import photo_like_image

    rng = np.random.default_rng(len(path.name))
    keys, members = [], []
    for i in range(count):
        key = f"{path.stem}_{i:09d}"
        if i == 1:
            data, ext = image_bytes((200, 90, 40, 100), "PNG", size=(70, 50), mode="RGBA"), "png"
        else:
            data, ext = image_bytes(photo_like_image(80, rng), quality=95), "jpg"
        if key == cut:
            data = data[: data.index(b"\xff\xda") + 40]
        members += sample_members(key, data, f"caption {i}", {"key": key}, extension=ext)
        keys.append(key)
    write_tar(path, members)
    return keys


def test_decoding_paths_embed_alike(tmp_path, demo_encoder):
    """torchvision: JPEGs by libjpeg-turbo and tensor resizing, close to PIL's; cuda (its GPU
    half run on the CPU here): the torchvision path's embeddings exactly, and a JPEG no
    decoder reads is skipped with its reason, as PIL's path skips it."""
    path = tmp_path / "00007.tar"
    keys = write_photo_shard(path, 7, cut="00007_000000004")
    results = {
        decode: embed_shard(path, demo_encoder, 3, 1, show_progress=False, decode=decode)
        for decode in ("pil", "torchvision", "cuda")
    }
    expected = [key for key in keys if key != "00007_000000004"]
    for decode, result in results.items():
        assert result.keys == expected, decode
        assert [key for key, _ in result.skipped] == ["00007_000000004"], decode
        assert result.skipped[0][1].startswith("undecodable jpg"), result.skipped
    pil, vision, cuda = (results[d].image_emb.astype(np.float32) for d in results)
    cosines = (pil * vision).sum(axis=1)
    assert cosines.min() > 0.98, cosines
    assert np.array_equal(cuda, vision)
    assert np.array_equal(results["cuda"].text_emb, results["pil"].text_emb)


def test_one_job_embeds_its_shards_in_turn(tmp_path):
    """Shards of one job through one loader (an empty one among them): a Parquet per shard,
    each with its own rows, and one skipped list."""
    shards = [tmp_path / "00000.tar", tmp_path / "00001.tar", tmp_path / "00002.tar"]
    first = write_photo_shard(shards[0], 5)
    write_tar(shards[1], [])
    third = write_photo_shard(shards[2], 4, cut="00002_000000003")
    outs = [tmp_path / "embed" / f"{shard.stem}.parquet" for shard in shards]
    options = {**DEMO_OPTIONS, "num_workers": 2, "decode": "torchvision"}
    main(
        ["--shard", *map(str, shards), "--out", *map(str, outs), "--no-progress",
         "--skipped", str(tmp_path / "skipped.csv"), "--options-json", json.dumps(options)]
    )  # fmt: skip
    tables = [pq.read_table(out) for out in outs]
    assert tables[0]["key"].to_pylist() == first
    assert tables[1].num_rows == 0 and tables[1].schema == tables[0].schema
    assert tables[2]["key"].to_pylist() == third[:3]
    with open(tmp_path / "skipped.csv", newline="") as handle:
        assert [row[0] for row in csv.reader(handle)] == ["key", "00002_000000003"]


def test_cuda_decoding_needs_a_gpu(shard, tmp_path):
    path, _ = shard
    options = {**DEMO_OPTIONS, "decode": "cuda"}
    args = ["--shard", str(path), "--out", str(tmp_path / "o.parquet"), "--skipped"]
    args += [str(tmp_path / "s.csv"), "--options-json", json.dumps(options)]
    with pytest.raises(UnicomError, match="embed.decode: cuda decodes on the GPU"):
        main(args)
