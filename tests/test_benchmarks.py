"""Benchmark loaders on small FAKE folder trees laid out like each published dataset.

The image files written here are empty placeholders: the loaders only list paths and
labels (and check that the files exist); nothing decodes them.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.io
from PIL import Image

from unicom.benchmarks import available, load
from unicom.benchmarks.__main__ import main
from unicom.benchmarks.demo_sets import read_idx
from unicom.benchmarks.readers import GLDV2_DISTRACTOR
from unicom.benchmarks.sets import QUERY_GALLERY, SINGLE, load_image
from unicom.errors import UnicomError
from unicom.io import write_parquet

from helpers import REPO
from helpers.images import write_idx


def touch(root: Path, rels) -> None:
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def fake_cub(parent: Path) -> Path:
    root = parent / "CUB_200_2011"
    classes = [1, 100, 101, 150, 200, 200]
    rels = [f"{c:03d}.Bird_{c}/Bird_{i}.jpg" for i, c in enumerate(classes, start=1)]
    write_lines(root / "images.txt", [f"{i} {rel}" for i, rel in enumerate(rels, start=1)])
    write_lines(
        root / "image_class_labels.txt", [f"{i} {c}" for i, c in enumerate(classes, start=1)]
    )
    touch(root / "images", rels)
    return root


def test_cub_test_split_is_classes_101_to_200(tmp_path):
    root = fake_cub(tmp_path)
    cub = load("cub", tmp_path)  # the parent of CUB_200_2011/ works too
    assert cub.protocol == SINGLE and cub.root == str(root)
    assert cub.labels == ("101", "150", "200", "200")
    assert cub.items[0] == str(root / "images/101.Bird_101/Bird_3.jpg")
    assert cub.query_items == cub.gallery_items == cub.items
    (root / "images/200.Bird_200/Bird_6.jpg").unlink()
    with pytest.raises(UnicomError, match="1 of 4 listed images are missing, e.g. .*Bird_6.jpg"):
        load("cub", root)
    assert len(load("cub", root, check_files=False).items) == 4
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(UnicomError, match="expected file .*image_class_labels.txt is missing"):
        load("cub", root)


def cars_records(fields, rows):
    records = np.zeros((1, len(rows)), dtype=[(name, "O") for name in fields])
    for i, row in enumerate(rows):
        records[0, i] = tuple(
            np.array([[v]], dtype=np.uint8) if isinstance(v, int) else v for v in row
        )
    return records


def test_cars_from_cars_annos_mat(tmp_path):
    rows = [(f"car_ims/{i:06d}.jpg", c, i % 2) for i, c in enumerate([1, 98, 99, 150, 196], 1)]
    annotations = cars_records(("relative_im_path", "class", "test"), rows)
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": annotations})
    touch(tmp_path, [row[0] for row in rows])
    cars = load("cars", tmp_path)
    assert cars.labels == ("99", "150", "196")
    assert cars.items == tuple(str(tmp_path / f"car_ims/{i:06d}.jpg") for i in (3, 4, 5))


def test_cars_from_devkit_layout(tmp_path):
    train = cars_records(("fname", "class"), [("00001.jpg", 5), ("00002.jpg", 120)])
    test = cars_records(("fname", "class"), [("00001.jpg", 99), ("00002.jpg", 98)])
    (tmp_path / "devkit").mkdir()
    scipy.io.savemat(tmp_path / "devkit/cars_train_annos.mat", {"annotations": train})
    touch(tmp_path, ["cars_train/00001.jpg", "cars_train/00002.jpg", "cars_test/00001.jpg"])
    touch(tmp_path, ["cars_test/00002.jpg"])
    with pytest.raises(UnicomError, match="cars_test_annos_withlabels.mat is missing"):
        load("cars", tmp_path)
    scipy.io.savemat(tmp_path / "cars_test_annos_withlabels.mat", {"annotations": test})
    cars = load("cars", tmp_path)
    assert cars.labels == ("120", "99")
    assert cars.items == (
        str(tmp_path / "cars_train/00002.jpg"),
        str(tmp_path / "cars_test/00001.jpg"),
    )


def test_sop_reads_ebay_test(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    rows = ["1 11319 1 bicycle_final/111_0.JPG", "2 11319 1 bicycle_final/111_1.JPG"]
    rows += ["3 11320 2 chair_final/222_0.JPG"]
    write_lines(root / "Ebay_test.txt", ["image_id class_id super_class_id path", *rows])
    touch(root, [row.split()[3] for row in rows])
    sop = load("sop", tmp_path)
    assert sop.labels == ("11319", "11319", "11320")
    assert sop.items[2] == str(root / "chair_final/222_0.JPG")
    write_lines(root / "Ebay_test.txt", ["image_id class_id super_class_id path", "4 1 2"])
    with pytest.raises(UnicomError, match=r"Ebay_test.txt:2: expected 4 fields, got 3"):
        load("sop", root)


def test_inshop_returns_query_and_gallery(tmp_path):
    rows = [
        "img/WOMEN/Dresses/id_00000001/01_1_front.jpg id_00000001 train",
        "img/WOMEN/Dresses/id_00000002/01_1_front.jpg id_00000002 query",
        "img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 gallery",
        "img/MEN/Denim/id_00000003/01_1_front.jpg     id_00000003 gallery",
        "img/MEN/Denim/id_00000003/02_1_front.jpg id_00000003 query",
        "img/MEN/Denim/id_00000003/03_1_front.jpg id_00000003 gallery",
    ]
    listing = tmp_path / "Eval/list_eval_partition.txt"
    write_lines(listing, ["6", "image_name item_id evaluation_status", *rows])
    touch(tmp_path, [row.split()[0] for row in rows])
    inshop = load("inshop", tmp_path)
    assert inshop.protocol == QUERY_GALLERY and inshop.num_queries == 2
    assert inshop.query_labels == ("id_00000002", "id_00000003")
    assert inshop.gallery_labels == ("id_00000002", "id_00000003", "id_00000003")
    assert inshop.query_items[1] == str(tmp_path / "img/MEN/Denim/id_00000003/02_1_front.jpg")
    assert inshop.summary()["gallery"] == 3
    inputs = inshop.metric_inputs(np.arange(10).reshape(5, 2))
    assert inputs["query_emb"].tolist() == [[0, 1], [2, 3]]
    assert inputs["gallery_labels"] == ["id_00000002", "id_00000003", "id_00000003"]
    with pytest.raises(UnicomError, match="4 embeddings for 5 items"):
        inshop.metric_inputs(np.zeros((4, 2)))
    write_lines(listing, ["7", "image_name item_id evaluation_status", *rows])
    with pytest.raises(UnicomError, match="first line says 7 images, found 6"):
        load("inshop", tmp_path)


def test_inaturalist_labels_come_from_the_class_folder(tmp_path):
    rels = [
        "train_val2018/Plantae/7477/3b60c9486db1d2ee875f11a669fbde4b.jpg",
        "train_val2018/Plantae/7477/8c2f5f8e0dff4e1b4f9b1ad5e4f2d1c0.jpg",
        "train_val2018/Aves/3012/0a1b2c3d4e5f60718293a4b5c6d7e8f9.jpg",
    ]
    write_lines(tmp_path / "Inat_dataset_splits/Inaturalist_test_set1.txt", rels)
    touch(tmp_path, rels)
    inat = load("inaturalist", tmp_path)
    assert inat.labels == ("7477", "7477", "3012")
    assert inat.items[2] == str(tmp_path / rels[2])


def test_vehicleid_default_is_the_2400_list(tmp_path):
    root = tmp_path / "VehicleID_V1.0"
    write_lines(root / "train_test_split/test_list_2400.txt", ["0001 10", "0002 10", "0003 11"])
    write_lines(root / "train_test_split/test_list_800.txt", ["0001 10", "0002 10"])
    touch(root / "image", ["0001.jpg", "0002.jpg", "0003.jpg"])
    large = load("vehicleid", tmp_path)
    assert large.labels == ("10", "10", "11") and large.name == "vehicleid"
    assert large.items[2] == str(root / "image/0003.jpg")
    small = load("vehicleid-800", tmp_path)
    assert len(small.items) == 2 and small.name == "vehicleid-800"
    assert available("vehicleid-1600", tmp_path / "absent") == (
        False,
        f"vehicleid-1600: skipped, {tmp_path / 'absent'} does not exist",
    )
    with pytest.raises(UnicomError, match="test_list_1600.txt is missing"):
        available("vehicleid-1600", tmp_path)


def gldv2_image(folder: str, image_id: str) -> str:
    return f"{folder}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def test_gldv2_groups_queries_by_relevant_set(tmp_path):
    index = ["aa01", "bb02", "cc03", "dd04", "ee05"]
    write_lines(tmp_path / "index.csv", ["id", *index])
    solution = [
        "id,images,Usage",
        "q001,aa01 bb02,Public",
        "q002,bb02 aa01,Private",  # same landmark as q001: same relevant set
        "q003,None,Ignored",
        "q004,cc03,Public",
        "q005,dd04,Ignored",
    ]
    write_lines(tmp_path / "retrieval_solution_v2.1.csv", solution)
    touch(tmp_path, [gldv2_image("index", i) for i in index])
    touch(tmp_path, [gldv2_image("test", q) for q in ("q001", "q002", "q004")])
    gld = load("gldv2", tmp_path)
    assert gld.protocol == QUERY_GALLERY
    assert gld.query_labels == ("q001", "q001", "q004")
    assert gld.gallery_labels == ("q001", "q001", "q004", GLDV2_DISTRACTOR, GLDV2_DISTRACTOR)
    assert gld.query_items[2] == str(tmp_path / "test/q/0/0/q004.jpg")
    assert gld.gallery_items[0] == str(tmp_path / "index/a/a/0/aa01.jpg")
    write_lines(tmp_path / "retrieval_solution_v2.1.csv", [*solution, "q006,aa01,Private"])
    with pytest.raises(UnicomError, match="index image aa01 is relevant to queries"):
        load("gldv2", tmp_path)
    write_lines(tmp_path / "retrieval_solution_v2.1.csv", [*solution, "q006,zz99,Private"])
    with pytest.raises(UnicomError, match="q006 lists zz99, not in index.csv"):
        load("gldv2", tmp_path)


def test_openclipart_heldout_parquet(tmp_path):
    touch(tmp_path, ["clip/animals/cat.png", "clip/animals/dog.png", "clip/food/pie.png"])
    paths = [str(tmp_path / p) for p in ("clip/animals/cat.png", "clip/animals/dog.png")]
    paths.append("clip/food/pie.png")  # relative: resolved beside the Parquet file
    table = pa.table({"path": paths, "category": ["animals", "animals", "food"], "url": paths})
    write_parquet(tmp_path / "heldout.parquet", table)
    clip = load("openclipart", tmp_path / "heldout.parquet")
    assert clip.labels == ("animals", "animals", "food")
    assert clip.items[2] == str(tmp_path / "clip/food/pie.png")
    assert available("openclipart", None) == (False, "openclipart: skipped, no path configured")
    write_parquet(tmp_path / "bad.parquet", pa.table({"path": paths}))
    with pytest.raises(UnicomError, match="missing column.*category"):
        load("openclipart", tmp_path / "bad.parquet")


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 9, 3, 3, 1]))
    fashion = load("fashion-mnist", tmp_path)
    assert fashion.labels == ("T-shirt/top", "Ankle boot", "Dress", "Dress", "Trouser")
    first = fashion.items[0]
    assert isinstance(first, Image.Image) and first.mode == "L" and first.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(first), images[0])
    rgb = load_image(first)
    assert rgb.mode == "RGB" and np.asarray(rgb)[..., 2].tolist() == images[0].tolist()

    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2]))
    with pytest.raises(UnicomError, match="do not match"):
        load("fashion-mnist", tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1]), magic_type=0x0D)
    with pytest.raises(UnicomError, match="bad magic number"):
        load("fashion-mnist", tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 4) + b"\x00\x01")
    with pytest.raises(UnicomError, match="header says shape"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")


def test_load_image_reads_a_path_as_rgb(tmp_path):
    Image.new("L", (4, 3), 200).save(tmp_path / "grey.png")
    image = load_image(str(tmp_path / "grey.png"))
    assert image.mode == "RGB" and image.size == (4, 3)


def test_available_and_errors(tmp_path):
    assert available("cub", None) == (False, "cub: skipped, no path configured")
    assert available("sop", tmp_path / "nope")[0] is False
    with pytest.raises(UnicomError, match=r"sop: expected file .*Ebay_test.txt is missing"):
        available("sop", tmp_path)  # exists, wrong layout: a configuration error
    fake_cub(tmp_path)
    assert available("cub", tmp_path) == (True, f"cub: found at {tmp_path / 'CUB_200_2011'}")
    with pytest.raises(UnicomError, match="unknown benchmark 'mnist'"):
        available("mnist", tmp_path)


def test_cli_summary(tmp_path, capsys):
    fake_cub(tmp_path)
    out = tmp_path / "summary.json"
    main(["cub", str(tmp_path), "--out", str(out)])
    summary = json.loads(out.read_text())
    assert summary["items"] == 4 and summary["classes"] == 3
    assert "items=4" in capsys.readouterr().out
    with pytest.raises(UnicomError, match="^sop: no path given$"):
        main(["sop"])


def test_cli_fails_in_one_line_on_a_missing_folder(tmp_path):
    """A check by hand: a folder that is not there is an error (the workflow's evaluate
    plans no job for an unset path and fails its job on an absent one)."""
    missing = tmp_path / "does/not/exist"
    result = subprocess.run(
        [sys.executable, "-m", "unicom.benchmarks", "cub", str(missing)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "workflow")},
        check=False,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"unicom: error: cub: {missing} does not exist"


# --- train splits ---------------------------------------------------------------------------
def fake_train_splits(tmp_path: Path) -> dict[str, Path]:
    """Each published layout with both splits (the test-split fakes above, plus train files)."""
    roots = {"cub": fake_cub(tmp_path / "cub")}
    rows = [(f"car_ims/{i:06d}.jpg", c, 0) for i, c in enumerate([1, 98, 99, 150, 196], 1)]
    cars = tmp_path / "cars"
    cars.mkdir()
    annotations = cars_records(("relative_im_path", "class", "test"), rows)
    scipy.io.savemat(cars / "cars_annos.mat", {"annotations": annotations})
    touch(cars, [row[0] for row in rows])
    roots["cars"] = cars
    sop = tmp_path / "sop"
    header = "image_id class_id super_class_id path"
    write_lines(
        sop / "Ebay_train.txt", [header, "1 1 1 a/1_0.JPG", "2 1 1 a/1_1.JPG", "3 2 1 a/2_0.JPG"]
    )
    write_lines(sop / "Ebay_test.txt", [header, "4 11319 1 b/9_0.JPG", "5 11319 1 b/9_1.JPG"])
    touch(sop, ["a/1_0.JPG", "a/1_1.JPG", "a/2_0.JPG", "b/9_0.JPG", "b/9_1.JPG"])
    roots["sop"] = sop
    inshop = tmp_path / "inshop"
    listing = [
        "img/A/id_1/01.jpg id_1 train", "img/A/id_1/02.jpg id_1 train",
        "img/B/id_2/01.jpg id_2 query", "img/B/id_2/02.jpg id_2 gallery",
    ]  # fmt: skip
    write_lines(
        inshop / "list_eval_partition.txt", ["4", "image_name item_id evaluation_status", *listing]
    )
    touch(inshop, [row.split()[0] for row in listing])
    roots["inshop"] = inshop
    inat = tmp_path / "inat"
    train_rels = ["train_val2018/Aves/1/a.jpg", "train_val2018/Aves/2/b.jpg"]
    test_rels = ["train_val2018/Aves/3/c.jpg", "train_val2018/Aves/3/d.jpg"]
    write_lines(inat / "Inat_dataset_splits/Inaturalist_train_set1.txt", train_rels)
    write_lines(inat / "Inat_dataset_splits/Inaturalist_test_set1.txt", test_rels)
    touch(inat, train_rels + test_rels)
    roots["inaturalist"] = inat
    vehicle = tmp_path / "vehicleid"
    write_lines(vehicle / "train_test_split/train_list.txt", ["0001 1", "0002 1", "0003 2"])
    write_lines(vehicle / "train_test_split/test_list_2400.txt", ["0004 10", "0005 10"])
    touch(vehicle / "image", [f"000{i}.jpg" for i in range(1, 6)])
    roots["vehicleid"] = vehicle
    return roots


def test_train_and_test_splits_are_class_disjoint(tmp_path):
    """The deep-metric-learning protocol: no class of a benchmark's test split is trained on."""
    for name, root in fake_train_splits(tmp_path).items():
        train, test = load(name, root, split="train"), load(name, root, split="test")
        assert train.items and test.items, name
        assert set(train.labels).isdisjoint(test.labels), name
        assert set(train.items).isdisjoint(test.items), name
        assert train.split.startswith("train"), (name, train.split)
    assert load("cub", tmp_path / "cub", split="train").labels == ("1", "100")
    assert load("cars", tmp_path / "cars", split="train").labels == ("1", "98")
    assert load("inshop", tmp_path / "inshop", split="train").protocol == SINGLE
    with pytest.raises(UnicomError, match="split must be one of"):
        load("sop", tmp_path / "sop", split="val")
    (tmp_path / "sop/Ebay_train.txt").unlink()
    with pytest.raises(UnicomError, match="expected file .*Ebay_train.txt is missing"):
        load("sop", tmp_path / "sop", split="train")


def test_gldv2_train_clean(tmp_path):
    write_lines(tmp_path / "train_clean.csv", ["landmark_id,images", "7,aa01 bb02", "9,cc03"])
    touch(tmp_path, [gldv2_image("train", i) for i in ("aa01", "bb02", "cc03")])
    train = load("gldv2", tmp_path, split="train")
    assert train.labels == ("7", "7", "9")
    assert train.items[2] == str(tmp_path / "train/c/c/0/cc03.jpg")


def test_offline_train_splits(tmp_path):
    """Fashion-MNIST's 60k-image train files and the demo pool's URL list (file:// URLs)."""
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([5, 5, 7]))
    train = load("fashion-mnist", tmp_path, split="train")
    assert train.labels == ("Sandal", "Sandal", "Sneaker") and train.split == "train: train"
    touch(tmp_path, ["pool/animals/cat.png", "pool/food/pie.png"])
    urls = [(tmp_path / p).as_uri() for p in ("pool/animals/cat.png", "pool/food/pie.png")]
    write_parquet(
        tmp_path / "urls.parquet", pa.table({"url": urls, "category": ["animals", "food"]})
    )
    pool = load("openclipart", tmp_path / "urls.parquet", split="train")
    assert pool.items == (
        str(tmp_path / "pool/animals/cat.png"),
        str(tmp_path / "pool/food/pie.png"),
    )
    assert pool.labels == ("animals", "food")
    write_parquet(
        tmp_path / "web.parquet", pa.table({"url": ["http://x/y.png"], "category": ["a"]})
    )
    with pytest.raises(UnicomError, match="is not a file:// URL of the demo pool"):
        load("openclipart", tmp_path / "web.parquet", split="train")


def test_image_folder_layout_for_probes(tmp_path):
    """torchvision's ImageFolder layout: ROOT/train/<class>/, ROOT/test/ (or ROOT/val/)."""
    touch(
        tmp_path, ["train/cat/1.png", "train/cat/2.jpg", "train/dog/3.png", "train/dog/notes.txt"]
    )
    touch(tmp_path, ["val/cat/4.png", "val/dog/5.png"])
    train = load("cifar-like", tmp_path, split="train", image_folder=True)
    assert train.labels == ("cat", "cat", "dog") and train.name == "cifar-like"
    test = load("cifar-like", tmp_path, image_folder=True)
    assert test.labels == ("cat", "dog") and test.split == "test: val/"
    with pytest.raises(UnicomError, match="image folder .* does not exist"):
        load("cifar-like", tmp_path / "absent", image_folder=True)
