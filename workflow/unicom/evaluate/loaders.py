"""Retrieval benchmark loaders: the standard test splits, read from their published layouts.

Each loader takes the folder the dataset was extracted to (or its parent, when the archive
extracts into a named folder such as ``CUB_200_2011/``) and returns a ``RetrievalSet``. Only the
evaluation split is loaded; the classes it holds never appear in the training splits of the
deep-metric-learning protocol. A layout that does not match raises a one-line ``UnicomError``
naming the file that was expected.

Expected layouts (``ROOT`` is the path given):

==============  ==========================================================================
cub             ``ROOT/images.txt``, ``ROOT/image_class_labels.txt``, ``ROOT/images/``
                (or ``ROOT/CUB_200_2011/...``). Test: classes 101-200 (5,924 images).
cars            ``ROOT/cars_annos.mat`` + ``ROOT/car_ims/``, or the devkit layout:
                ``ROOT/devkit/cars_train_annos.mat``, ``cars_test_annos_withlabels.mat``
                (in ``ROOT`` or ``ROOT/devkit``), ``ROOT/cars_train/``, ``ROOT/cars_test/``.
                Test: classes 99-196 (8,131 images).
sop             ``ROOT/Ebay_test.txt`` (``image_id class_id super_class_id path``) with
                the paths under ``ROOT`` (or ``ROOT/Stanford_Online_Products/``).
                Test: 60,502 images of 11,316 products.
inshop          ``ROOT/list_eval_partition.txt`` or ``ROOT/Eval/list_eval_partition.txt``
                (count line, header, then ``image_name item_id evaluation_status``) and
                ``ROOT/img/``. Query: 14,218 images; gallery: 12,612 images (3,985 items).
inaturalist     ``ROOT/Inat_dataset_splits/Inaturalist_test_set1.txt``: one image path per
                line, relative to ``ROOT`` (``train_val2018/<kingdom>/<class>/<file>.jpg``);
                the label is the class folder. This is the split of Brown et al. (Smooth-AP,
                2020) used by ROADMAP and Unicom: 136,093 images of 2,452 classes.
vehicleid       ``ROOT/train_test_split/test_list_2400.txt`` (``image_id vehicle_id``) and
                ``ROOT/image/<image_id>.jpg`` (or ``ROOT/VehicleID_V1.0/...``). The large
                test set (2,400 vehicles) by default; ``vehicleid-800`` and
                ``vehicleid-1600`` load the small and medium ones. Single-set protocol over
                the chosen list, as deep-metric-learning papers report it.
gldv2           Google Landmarks v2, retrieval challenge 2019 ground truth (v2.1):
                ``ROOT/retrieval_solution_v2.1.csv`` (``id,images,Usage``), ``ROOT/index.csv``
                (``id`` column) and images at ``ROOT/{test,index}/a/b/c/abc....jpg``.
                Queries: test images whose Usage is Public or Private and that have
                relevant images; gallery: every index image. Queries with the same
                relevant set share a label; index images relevant to no query are
                distractors (a label no query has). Metrics are label-based
                (MAP@R, not the challenge's mAP@100).
openclipart     the held-out Parquet written by ``unicom.demo.build pool --out-heldout``
                (columns ``path``, ``category``; label = category).
fashion-mnist   ``ROOT/t10k-images-idx3-ubyte.gz`` and ``ROOT/t10k-labels-idx1-ubyte.gz``
                (Debian package ``dataset-fashion-mnist``; ROOT defaults to
                ``/usr/share/datasets/fashion-mnist``): the 10,000 test images as 28x28
                grayscale PIL images, labelled by class name.
==============  ==========================================================================
"""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from unicom.errors import UnicomError
from unicom.evaluate.sets import RetrievalSet, query_gallery_set, single_set
from unicom.planning import FASHION_MNIST_DIR

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


VEHICLEID_SIZES = (800, 1600, 2400)


GLDV2_SOLUTION = "retrieval_solution_v2.1.csv"


GLDV2_USAGES = ("Public", "Private")


# Gallery label of GLDv2 index images relevant to no query (no query label starts with '#').
GLDV2_DISTRACTOR = "#distractor"


def _require(path: Path) -> Path:
    if not path.exists():
        raise UnicomError(f"expected file {path} is missing")
    return path


def _read_table(path: Path, columns: int, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of exactly ``columns`` fields (after ``skip`` header lines)."""
    rows = []
    with open(_require(path), encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if number <= skip or not line.strip():
                continue
            fields = line.split()
            if len(fields) != columns:
                raise UnicomError(
                    f"{path}:{number}: expected {columns} fields, "
                    f"got {len(fields)}: {line.strip()!r}"
                )
            rows.append(fields)
    return rows


def _check_files(name: str, paths: Sequence[str]) -> None:
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise UnicomError(
            f"{name}: {len(missing)} of {len(paths)} listed images are missing, e.g. {missing[0]}"
        )


def _int(value: Any, where: str) -> int:
    try:
        return int(np.asarray(value).squeeze())
    except (TypeError, ValueError):
        raise UnicomError(f"{where}: expected an integer, got {value!r}") from None


def load_cub(root: Path, check_files: bool = True) -> RetrievalSet:
    """CUB-200-2011 test split: the 5,924 images of classes 101-200."""
    ids_paths = dict(_read_table(root / "images.txt", 2))
    classes = dict(_read_table(root / "image_class_labels.txt", 2))
    items, labels = [], []
    for image_id, rel in ids_paths.items():
        if image_id not in classes:
            raise UnicomError(f"{root / 'image_class_labels.txt'}: no class for image {image_id}")
        label = _int(classes[image_id], str(root / "image_class_labels.txt"))
        if label > 100:
            items.append(str(root / "images" / rel))
            labels.append(str(label))
    if check_files:
        _check_files("cub", items)
    return single_set("cub", "test: classes 101-200", items, labels, root)


def _mat_records(path: Path, key: str = "annotations") -> np.ndarray:
    import scipy.io  # only Cars196 needs scipy

    try:
        content = scipy.io.loadmat(_require(path), squeeze_me=True)
    except (ValueError, OSError) as err:
        raise UnicomError(f"{path}: not a readable .mat file ({err})") from None
    if key not in content:
        raise UnicomError(f"{path}: no {key!r} variable")
    return np.atleast_1d(content[key])


def _mat_field(records: np.ndarray, field: str, path: Path) -> list:
    if records.dtype.names is None or field not in records.dtype.names:
        raise UnicomError(f"{path}: annotations have no field {field!r}")
    return list(records[field])


def load_cars(root: Path, check_files: bool = True) -> RetrievalSet:
    """Cars196 test split: the 8,131 images of classes 99-196 (from both halves of the release)."""
    pairs: list[tuple[str, int]] = []
    annos = root / "cars_annos.mat"
    if annos.exists():
        records = _mat_records(annos)
        paths = _mat_field(records, "relative_im_path", annos)
        classes = _mat_field(records, "class", annos)
        pairs = [
            (str(root / str(p)), _int(c, str(annos))) for p, c in zip(paths, classes, strict=True)
        ]
    else:
        test_annos = root / "cars_test_annos_withlabels.mat"
        if not test_annos.exists():
            test_annos = root / "devkit" / "cars_test_annos_withlabels.mat"
        for mat, folder in (
            (root / "devkit" / "cars_train_annos.mat", "cars_train"),
            (test_annos, "cars_test"),
        ):
            records = _mat_records(mat)
            names = _mat_field(records, "fname", mat)
            classes = _mat_field(records, "class", mat)
            pairs += [
                (str(root / folder / str(n)), _int(c, str(mat)))
                for n, c in zip(names, classes, strict=True)
            ]
    test = [(path, str(label)) for path, label in pairs if label > 98]
    items = [path for path, _ in test]
    if check_files:
        _check_files("cars", items)
    return single_set("cars", "test: classes 99-196", items, [lab for _, lab in test], root)


def load_sop(root: Path, check_files: bool = True) -> RetrievalSet:
    """Stanford Online Products test split (``Ebay_test.txt``): 60,502 images, 11,316 products."""
    rows = _read_table(root / "Ebay_test.txt", 4, skip=1)
    items = [str(root / row[3]) for row in rows]
    labels = [row[1] for row in rows]
    if check_files:
        _check_files("sop", items)
    return single_set("sop", "test: Ebay_test.txt", items, labels, root)


def _inshop_list(root: Path) -> Path:
    for candidate in (root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"):
        if candidate.exists():
            return candidate
    return root / "Eval" / "list_eval_partition.txt"


def load_inshop(root: Path, check_files: bool = True) -> RetrievalSet:
    """In-Shop Clothes: queries (14,218) vs gallery (12,612) of ``list_eval_partition.txt``.

    Image paths in the list (``img/...``) are relative to the folder holding ``img/``: ROOT.
    """
    listing = _require(_inshop_list(root))
    with open(listing, encoding="utf-8") as handle:
        first = handle.readline().strip()
    # The release starts with a count line, then the header; tolerate a missing count line.
    rows = _read_table(listing, 3, skip=2 if first.isdigit() else 1)
    if first.isdigit() and int(first) != len(rows):
        raise UnicomError(f"{listing}: first line says {first} images, found {len(rows)}")
    split = {"query": ([], []), "gallery": ([], [])}
    for image, item_id, status in rows:
        if status in split:
            split[status][0].append(str(root / image))
            split[status][1].append(item_id)
        elif status != "train":
            raise UnicomError(f"{listing}: unknown evaluation_status {status!r}")
    (queries, query_labels), (gallery, gallery_labels) = split["query"], split["gallery"]
    if check_files:
        _check_files("inshop", queries + gallery)
    return query_gallery_set(
        "inshop", "query vs gallery", queries, query_labels, gallery, gallery_labels, root
    )


INAT_TEST_LIST = "Inat_dataset_splits/Inaturalist_test_set1.txt"


def load_inaturalist(root: Path, check_files: bool = True) -> RetrievalSet:
    """iNaturalist 2018, test split of Brown et al.: 136,093 images of 2,452 classes."""
    listing = _require(root / INAT_TEST_LIST)
    rels = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()]
    rels = [rel for rel in rels if rel]
    labels = []
    for number, rel in enumerate(rels, start=1):
        parts = Path(rel).parts
        if len(parts) < 2:
            raise UnicomError(f"{listing}:{number}: expected <...>/<class>/<file>, got {rel!r}")
        labels.append(parts[-2])
    items = [str(root / rel) for rel in rels]
    if check_files:
        _check_files("inaturalist", items)
    return single_set("inaturalist", "test: Inaturalist_test_set1.txt", items, labels, root)


def load_vehicleid(root: Path, size: int = 2400, check_files: bool = True) -> RetrievalSet:
    """VehicleID test list of ``size`` vehicles (800, 1600 or 2400), as one set."""
    if size not in VEHICLEID_SIZES:
        raise UnicomError(f"vehicleid: test size must be one of {VEHICLEID_SIZES}, got {size}")
    rows = _read_table(root / "train_test_split" / f"test_list_{size}.txt", 2)
    items = [str(root / "image" / f"{image_id}.jpg") for image_id, _ in rows]
    labels = [vehicle_id for _, vehicle_id in rows]
    name = "vehicleid" if size == 2400 else f"vehicleid-{size}"
    if check_files:
        _check_files(name, items)
    return single_set(name, f"test: test_list_{size}.txt", items, labels, root)


def _gldv2_path(root: Path, folder: str, image_id: str) -> str:
    return str(root / folder / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")


def _csv_rows(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    with open(_require(path), newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise UnicomError(f"{path}: missing column(s) {missing} (has {reader.fieldnames})")
        return list(reader)


def load_gldv2(root: Path, check_files: bool = True) -> RetrievalSet:
    """GLDv2 retrieval (2019 challenge, v2.1 ground truth): scored test queries vs the index."""
    solution = root / GLDV2_SOLUTION
    index_ids = [row["id"] for row in _csv_rows(root / "index.csv", ["id"])]
    known = set(index_ids)
    group_of_set: dict[frozenset[str], str] = {}
    queries, query_labels = [], []
    for row in _csv_rows(solution, ["id", "images", "Usage"]):
        relevant = frozenset(row["images"].split()) - {"None"}
        if row["Usage"] not in GLDV2_USAGES or not relevant:
            continue
        unknown = relevant - known
        if unknown:
            raise UnicomError(
                f"{solution}: query {row['id']} lists {min(unknown)}, not in index.csv"
            )
        # Queries with the same relevant images form one class, named after its first query.
        label = group_of_set.setdefault(relevant, row["id"])
        queries.append(_gldv2_path(root, "test", row["id"]))
        query_labels.append(label)
    label_of_image: dict[str, str] = {}
    for relevant, label in group_of_set.items():
        for image_id in relevant:
            other = label_of_image.setdefault(image_id, label)
            if other != label:
                raise UnicomError(
                    f"{solution}: index image {image_id} is relevant to queries {other} and "
                    f"{label} with different relevant sets; overlapping sets are not supported"
                )
    gallery = [_gldv2_path(root, "index", image_id) for image_id in index_ids]
    gallery_labels = [label_of_image.get(image_id, GLDV2_DISTRACTOR) for image_id in index_ids]
    if check_files:
        _check_files("gldv2", queries + gallery)
    split = f"scored ({'/'.join(GLDV2_USAGES)}) test queries vs index"
    return query_gallery_set("gldv2", split, queries, query_labels, gallery, gallery_labels, root)


def load_openclipart(path: Path, check_files: bool = True) -> RetrievalSet:
    """The demo's held-out openclipart images (Parquet from ``unicom.demo.build``), as one set.

    Relative paths are taken relative to the Parquet file's folder.
    """
    names = pq.read_schema(_require(path)).names
    missing = [c for c in ("path", "category") if c not in names]
    if missing:
        raise UnicomError(f"{path}: missing column(s) {missing} (has {names})")
    table = pq.read_table(path, columns=["path", "category"])
    items = [str(path.parent / p) for p in table["path"].to_pylist()]
    labels = [str(c) for c in table["category"].to_pylist()]
    if check_files:
        _check_files("openclipart", items)
    return single_set("openclipart", "held-out split of the demo pool", items, labels, path)


IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Decode a gzipped idx file of unsigned bytes (the MNIST format) into an array."""
    with gzip.open(_require(path), "rb") as handle:
        try:
            data = handle.read()
        except (OSError, EOFError) as err:
            raise UnicomError(f"{path}: not a readable gzip file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != IDX_UBYTE:
        raise UnicomError(f"{path}: not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(data[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise UnicomError(
            f"{path}: header says shape {shape} ({expected} bytes), file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: Path | None = None, check_files: bool = True) -> RetrievalSet:
    """Fashion-MNIST test split: 10,000 28x28 grayscale PIL images, labelled by class name."""
    root = FASHION_MNIST_DIR if root is None else root
    images = read_idx(root / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UnicomError(
            f"{root}: t10k images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise UnicomError(f"{root / 't10k-labels-idx1-ubyte.gz'}: label {labels.max()} > 9")
    # 2-D uint8 arrays become mode "L" images.
    items = [Image.fromarray(image) for image in images]
    names = [FASHION_MNIST_CLASSES[int(label)] for label in labels]
    return single_set("fashion-mnist", "test: t10k", items, names, root)
