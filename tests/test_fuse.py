import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicom import formats
from unicom.embed.fuse import fuse_embeddings, fuse_file, main
from unicom.errors import UnicomError


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_concat_is_weighted_and_renormalised():
    image = unit(np.array([[3.0, 4.0]]))
    text = unit(np.array([[0.0, 0.0, 2.0]]))
    fused = fuse_embeddings(image, text, "concat", image_weight=1.0, text_weight=1.0)
    np.testing.assert_allclose(fused, [[0.6, 0.8, 0.0, 0.0, 1.0]] / np.sqrt(2), rtol=1e-6)
    heavy_text = fuse_embeddings(image, text, "concat", image_weight=1.0, text_weight=3.0)
    assert heavy_text[0, 4] > fused[0, 4]
    np.testing.assert_allclose(np.linalg.norm(heavy_text, axis=1), 1.0, rtol=1e-6)


def test_mean_adds_the_normalised_parts():
    image = np.array([[10.0, 0.0]])
    text = np.array([[0.0, 0.1]])
    np.testing.assert_allclose(fuse_embeddings(image, text, "mean"), [[1, 1]] / np.sqrt(2))


def test_single_modalities_are_normalised_copies():
    image, text = np.array([[2.0, 0.0]]), np.array([[0.0, 0.0, 5.0]])
    np.testing.assert_allclose(fuse_embeddings(image, text, "image"), [[1.0, 0.0]])
    np.testing.assert_allclose(fuse_embeddings(image, text, "text"), [[0.0, 0.0, 1.0]])


def test_mean_refuses_unequal_dimensions():
    with pytest.raises(UnicomError, match="'mean' needs equal dimensions"):
        fuse_embeddings(np.ones((1, 2)), np.ones((1, 3)), "mean")


def write_embeddings(path, n: int, shared_space: bool) -> None:
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "key": [f"00000_{i:09d}" for i in range(n)],
            "caption": ["c"] * n,
            "url": ["u"] * n,
            "image_emb": formats.embedding_array(unit(rng.normal(size=(n, 8)))),
            "text_emb": formats.embedding_array(unit(rng.normal(size=(n, 8)))),
        }
    )
    identity = {"shared_space": shared_space, "image": {"name": "x"}, "text": {"name": "y"}}
    pq.write_table(formats.with_metadata(table, {formats.ENCODER_METADATA_KEY: identity}), path)


def test_fuse_file_keeps_keys_and_records_how(tmp_path):
    src, dst = tmp_path / "e.parquet", tmp_path / "f.parquet"
    write_embeddings(src, 5, shared_space=False)
    assert fuse_file(str(src), str(dst), {"mode": "concat"}) == 5
    out = pq.read_table(dst)
    assert out.column("key").to_pylist() == pq.read_table(src).column("key").to_pylist()
    assert out.schema.field("emb").type.list_size == 16
    vectors = formats.column_to_numpy(out["emb"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)  # float16
    recorded = formats.read_metadata(str(dst), formats.FUSION_METADATA_KEY)
    assert recorded == {"mode": "concat", "image_weight": 1.0, "text_weight": 1.0}  # + defaults
    assert sorted(tmp_path.iterdir()) == sorted([src, dst])  # no temporary file left


def test_mean_refused_for_separate_encoders_in_one_line(tmp_path, capsys):
    src = tmp_path / "e.parquet"
    write_embeddings(src, 3, shared_space=False)
    from unicom.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            main,
            [
                "--embeddings",
                str(src),
                "--out",
                str(tmp_path / "f.parquet"),
                "--options-json",
                '{"mode": "mean"}',
            ],
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "e.parquet: fuse.mode 'mean' needs image and text" in err[0]
    assert not (tmp_path / "f.parquet").exists()
