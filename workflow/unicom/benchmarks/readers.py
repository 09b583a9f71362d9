"""Retrieval benchmark readers: the standard splits, read from their published layouts.

Each reader takes the folder the dataset was extracted to (or its parent, when the archive
extracts into a named folder such as ``CUB_200_2011/``) and a ``split``: ``test`` (the
evaluation split) or ``train`` (what linear probes fit and supervised fine-tuning trains on,
``unicom.supervised``).
The two are class-disjoint, as the deep-metric-learning protocol has them: CUB classes 1-100 /
101-200, Cars 1-98 / 99-196, SOP ``Ebay_train.txt`` / ``Ebay_test.txt``, In-Shop's ``train``
rows / its query and gallery items, iNaturalist's ``Inaturalist_train_set1.txt`` /
``..._test_set1.txt``, VehicleID's ``train_list.txt`` / ``test_list_<size>.txt``, GLDv2's
``train_clean.csv`` (landmarks) / the retrieval challenge's index. A layout that does not match
raises a one-line ``UnicomError`` naming the file that was expected. The demo's offline sets
(openclipart, Fashion-MNIST) are in ``unicom.benchmarks.demo_sets``.

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
==============  ==========================================================================
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unicom.benchmarks.sets import RetrievalSet, query_gallery_set, single_set
from unicom.errors import UnicomError

SPLITS = ("train", "test")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
VEHICLEID_SIZES = (800, 1600, 2400)


GLDV2_SOLUTION = "retrieval_solution_v2.1.csv"
GLDV2_TRAIN = "train_clean.csv"


GLDV2_USAGES = ("Public", "Private")


# Gallery label of GLDv2 index images relevant to no query (no query label starts with '#').
GLDV2_DISTRACTOR = "#distractor"


def require_file(path: Path) -> Path:
    if not path.exists():
        raise UnicomError(f"expected file {path} is missing")
    return path


def _read_table(path: Path, columns: int, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of exactly ``columns`` fields (after ``skip`` header lines)."""
    rows = []
    with open(require_file(path), encoding="utf-8") as handle:
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


def check_listed_files(name: str, paths: Sequence[str]) -> None:
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise UnicomError(
            f"{name}: {len(missing)} of {len(paths)} listed images are missing, e.g. {missing[0]}"
        )


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UnicomError(f"split must be one of {SPLITS}, got {split!r}")


def _int(value: Any, where: str) -> int:
    try:
        return int(np.asarray(value).squeeze())
    except (TypeError, ValueError):
        raise UnicomError(f"{where}: expected an integer, got {value!r}") from None


def load_cub(root: Path, check_files: bool = True, split: str = "test") -> RetrievalSet:
    """CUB-200-2011: test = the 5,924 images of classes 101-200, train = classes 1-100."""
    check_split(split)
    ids_paths = dict(_read_table(root / "images.txt", 2))
    classes = dict(_read_table(root / "image_class_labels.txt", 2))
    items, labels = [], []
    for image_id, rel in ids_paths.items():
        if image_id not in classes:
            raise UnicomError(f"{root / 'image_class_labels.txt'}: no class for image {image_id}")
        label = _int(classes[image_id], str(root / "image_class_labels.txt"))
        if (label > 100) == (split == "test"):
            items.append(str(root / "images" / rel))
            labels.append(str(label))
    if check_files:
        check_listed_files("cub", items)
    what = "test: classes 101-200" if split == "test" else "train: classes 1-100"
    return single_set("cub", what, items, labels, root)


def _mat_records(path: Path, key: str = "annotations") -> np.ndarray:
    import scipy.io  # only Cars196 needs scipy

    try:
        content = scipy.io.loadmat(require_file(path), squeeze_me=True)
    except (ValueError, OSError) as err:
        raise UnicomError(f"{path}: not a readable .mat file ({err})") from None
    if key not in content:
        raise UnicomError(f"{path}: no {key!r} variable")
    return np.atleast_1d(content[key])


def _mat_field(records: np.ndarray, field: str, path: Path) -> list:
    if records.dtype.names is None or field not in records.dtype.names:
        raise UnicomError(f"{path}: annotations have no field {field!r}")
    return list(records[field])


def load_cars(root: Path, check_files: bool = True, split: str = "test") -> RetrievalSet:
    """Cars196: test = the 8,131 images of classes 99-196 (from both halves of the release),
    train = classes 1-98."""
    check_split(split)
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
    chosen = [(path, str(label)) for path, label in pairs if (label > 98) == (split == "test")]
    items = [path for path, _ in chosen]
    if check_files:
        check_listed_files("cars", items)
    what = "test: classes 99-196" if split == "test" else "train: classes 1-98"
    return single_set("cars", what, items, [lab for _, lab in chosen], root)


def load_sop(root: Path, check_files: bool = True, split: str = "test") -> RetrievalSet:
    """Stanford Online Products: ``Ebay_test.txt`` (60,502 images, 11,316 products) or
    ``Ebay_train.txt`` (59,551 images, 11,318 products)."""
    check_split(split)
    listing = f"Ebay_{split}.txt"
    rows = _read_table(root / listing, 4, skip=1)
    items = [str(root / row[3]) for row in rows]
    labels = [row[1] for row in rows]
    if check_files:
        check_listed_files("sop", items)
    return single_set("sop", f"{split}: {listing}", items, labels, root)


def _inshop_list(root: Path) -> Path:
    for candidate in (root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"):
        if candidate.exists():
            return candidate
    return root / "Eval" / "list_eval_partition.txt"


def load_inshop(root: Path, check_files: bool = True, split: str = "test") -> RetrievalSet:
    """In-Shop Clothes: queries (14,218) vs gallery (12,612) of ``list_eval_partition.txt``;
    train: its ``train`` rows (25,882 images of 3,997 items) as one set.

    Image paths in the list (``img/...``) are relative to the folder holding ``img/``: ROOT.
    """
    check_split(split)
    listing = require_file(_inshop_list(root))
    with open(listing, encoding="utf-8") as handle:
        first = handle.readline().strip()
    # The release starts with a count line, then the header; tolerate a missing count line.
    rows = _read_table(listing, 3, skip=2 if first.isdigit() else 1)
    if first.isdigit() and int(first) != len(rows):
        raise UnicomError(f"{listing}: first line says {first} images, found {len(rows)}")
    parts: dict[str, tuple[list[str], list[str]]] = {
        s: ([], []) for s in ("query", "gallery", "train")
    }
    for image, item_id, status in rows:
        if status not in parts:
            raise UnicomError(f"{listing}: unknown evaluation_status {status!r}")
        parts[status][0].append(str(root / image))
        parts[status][1].append(item_id)
    if split == "train":
        items, labels = parts["train"]
        if check_files:
            check_listed_files("inshop", items)
        return single_set("inshop", "train", items, labels, root)
    (queries, query_labels), (gallery, gallery_labels) = parts["query"], parts["gallery"]
    if check_files:
        check_listed_files("inshop", queries + gallery)
    return query_gallery_set(
        "inshop", "query vs gallery", queries, query_labels, gallery, gallery_labels, root
    )


INAT_TEST_LIST = "Inat_dataset_splits/Inaturalist_test_set1.txt"
INAT_TRAIN_LIST = "Inat_dataset_splits/Inaturalist_train_set1.txt"


def load_inaturalist(root: Path, check_files: bool = True, split: str = "test") -> RetrievalSet:
    """iNaturalist 2018, the splits of Brown et al.: test 136,093 images of 2,452 classes,
    train 325,846 images of 5,690 classes."""
    check_split(split)
    listing = require_file(root / (INAT_TEST_LIST if split == "test" else INAT_TRAIN_LIST))
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
        check_listed_files("inaturalist", items)
    return single_set("inaturalist", f"{split}: {listing.name}", items, labels, root)


def load_vehicleid(
    root: Path, size: int = 2400, check_files: bool = True, split: str = "test"
) -> RetrievalSet:
    """VehicleID test list of ``size`` vehicles (800, 1600 or 2400), as one set; train:
    ``train_list.txt`` (13,164 vehicles)."""
    check_split(split)
    if size not in VEHICLEID_SIZES:
        raise UnicomError(f"vehicleid: test size must be one of {VEHICLEID_SIZES}, got {size}")
    listing = f"test_list_{size}.txt" if split == "test" else "train_list.txt"
    rows = _read_table(root / "train_test_split" / listing, 2)
    items = [str(root / "image" / f"{image_id}.jpg") for image_id, _ in rows]
    labels = [vehicle_id for _, vehicle_id in rows]
    name = "vehicleid" if size == 2400 else f"vehicleid-{size}"
    if check_files:
        check_listed_files(name, items)
    return single_set(name, f"{split}: {listing}", items, labels, root)


def _gldv2_path(root: Path, folder: str, image_id: str) -> str:
    return str(root / folder / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")


def _csv_rows(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    with open(require_file(path), newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise UnicomError(f"{path}: missing column(s) {missing} (has {reader.fieldnames})")
        return list(reader)


def load_gldv2_train(root: Path, check_files: bool = True) -> RetrievalSet:
    """GLDv2 train clean (``ROOT/train_clean.csv``: ``landmark_id,images``; images at
    ``ROOT/train/a/b/c/abc....jpg``): 1,580,470 images of 81,313 landmarks."""
    items, labels = [], []
    for row in _csv_rows(root / GLDV2_TRAIN, ["landmark_id", "images"]):
        for image_id in row["images"].split():
            items.append(_gldv2_path(root, "train", image_id))
            labels.append(row["landmark_id"])
    if check_files:
        check_listed_files("gldv2", items)
    return single_set("gldv2", f"train: {GLDV2_TRAIN}", items, labels, root)


def load_gldv2(root: Path, check_files: bool = True, split: str = "test") -> RetrievalSet:
    """GLDv2 retrieval (2019 challenge, v2.1 ground truth): scored test queries vs the index;
    train: ``load_gldv2_train`` (its own download, usually another folder)."""
    check_split(split)
    if split == "train":
        return load_gldv2_train(root, check_files)
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
        check_listed_files("gldv2", queries + gallery)
    split = f"scored ({'/'.join(GLDV2_USAGES)}) test queries vs index"
    return query_gallery_set("gldv2", split, queries, query_labels, gallery, gallery_labels, root)


def load_image_folder(
    root: Path, check_files: bool = True, split: str = "test", name: str = "imagefolder"
) -> RetrievalSet:
    """A classification dataset in torchvision's ImageFolder layout, for linear probes:
    ``ROOT/train/<class>/<image>`` and ``ROOT/test/<class>/<image>`` (or ``ROOT/val/``), the
    label being the class folder (CIFAR-10/100, Food-101, ... once exported to files)."""
    check_split(split)
    folders = ["train"] if split == "train" else ["test", "val"]
    base = next((root / f for f in folders if (root / f).is_dir()), root / folders[0])
    if not base.is_dir():
        raise UnicomError(f"{name}: expected folder {base} (ImageFolder layout) is missing")
    items, labels = [], []
    for class_dir in sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                items.append(str(path))
                labels.append(class_dir.name)
    if check_files:
        check_listed_files(name, items)
    return single_set(name, f"{split}: {base.name}/", items, labels, root)
