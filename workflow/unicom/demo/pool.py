"""The pool: scan an image folder (one subfolder per category), drop what cannot be used,
caption, cap and split the rest. Every image found is accounted for: train, held out, capped
out, or dropped with a reason."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from unicom.demo.sampling import stratified_cap, stratified_heldout_mask
from unicom.demo.svg import (
    GENERIC_TITLE_MIN_SHARE,
    build_caption,
    generic_titles,
    normalize_tags,
    read_svg_metadata,
)
from unicom.errors import UnicomError
from unicom.formats import CAPTION_COLUMN, URL_COLUMN
from unicom.io import atomic_path

log = logging.getLogger("unicom.demo.pool")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})

# Ends every "no images" error, here and in debian.py (which imports it: pool does not need apt).
HOW_TO_GET_IMAGES = (
    "install them (apt-get install openclipart-png openclipart-svg), or set config key "
    "demo.image_dir to a folder of images with one subfolder per category"
)

POOL_SCHEMA = pa.schema(
    [
        (URL_COLUMN, pa.string()),
        (CAPTION_COLUMN, pa.string()),
        ("category", pa.string()),
        ("subcategory", pa.string()),
        ("title", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("path", pa.string()),
    ]
)


@dataclass(frozen=True)
class Candidate:
    path: Path  # absolute, as found (may be a symlink)
    rel: Path  # relative to the image root

    @property
    def subcategory(self) -> str:
        return self.rel.parent.as_posix()

    @property
    def category(self) -> str:
        return self.rel.parts[0] if len(self.rel.parts) > 1 else ""


@dataclass
class Dropped:
    path: str
    reason: str
    detail: str
    category: str


@dataclass
class PoolResult:
    train: pa.Table
    heldout: pa.Table
    dropped: list[Dropped]
    summary: dict = field(default_factory=dict)


def find_images(root: Path) -> list[Candidate]:
    """Every image file (or link to one) under ``root``, in sorted order; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            found.append(Candidate(path=path, rel=path.relative_to(root)))
    found.sort(key=lambda c: c.rel.as_posix())
    return found


def duplicate_links(candidates: Sequence[Candidate]) -> dict[int, Path]:
    """Index -> kept path, for entries that are links to a file already in the pool.

    openclipart files one picture under several categories through symlinks; keeping both
    copies would let the same picture land in train and held-out.
    """
    by_target: dict[Path, list[int]] = {}
    for i, cand in enumerate(candidates):
        by_target.setdefault(cand.path.resolve(), []).append(i)
    duplicates = {}
    for target, members in by_target.items():
        if len(members) < 2:
            continue
        real = [i for i in members if candidates[i].path == target]
        keep = real[0] if real else members[0]
        for i in members:
            if i != keep:
                duplicates[i] = candidates[keep].path
    return duplicates


def duplicate_contents(candidates: Sequence[Candidate], skip: set[int]) -> dict[int, Path]:
    """Index -> kept path, for files whose bytes equal an earlier (sorted) candidate's.

    Copies that are not links (the same file saved twice) would otherwise let one picture land
    in train and held-out, or train on itself twice; links are ``duplicate_links``' job.
    """
    first: dict[str, int] = {}
    duplicates = {}
    for i, cand in enumerate(candidates):
        if i in skip:
            continue
        digest = hashlib.sha256(cand.path.read_bytes()).hexdigest()
        kept = first.setdefault(digest, i)
        if kept != i:
            duplicates[i] = candidates[kept].path
    return duplicates


# File-name tokens that mark a variant of the same drawing (openclipart: pizza_cheese_bw.png
# next to pizza_cheese.png); such variants must not straddle the train/held-out split.
VARIANT_TOKENS = frozenset({"bw"})


def variant_group(path: Path) -> str:
    """The picture a file is a variant of: its stem without variant tokens (lower case)."""
    tokens = re.split(r"[_\-]", path.stem.lower())
    kept = [t for t in tokens if t not in VARIANT_TOKENS]
    return "_".join(kept or tokens)


def image_header_problem(path: Path, max_pixels: int | None = None) -> tuple[str, str] | None:
    """None if PIL can read the header (size only, no pixel decoding), else (reason, detail).

    Pictures above PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` by default;
    openclipart has a few 13000x13000 PNGs) are dropped too: decoding one takes ~0.7 GB.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except Image.DecompressionBombError as err:
        return "too_large", str(err)
    except Exception as err:  # PIL raises many types for bad files
        return "unreadable_image", f"{type(err).__name__}: {err}"
    if width < 1 or height < 1:
        return "unreadable_image", f"empty image {width}x{height}"
    if limit and width * height > limit:
        return "too_large", f"{width}x{height} is more than {limit} pixels"
    return None


def _rows_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=POOL_SCHEMA)


def build_pool(
    image_root: Path,
    svg_root: Path | None,
    heldout_fraction: float,
    max_images: int | None,
    seed: int,
) -> PoolResult:
    """Scan, filter, cap, caption and split the images under ``image_root``."""
    if not 0 <= heldout_fraction < 1:
        raise UnicomError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    if max_images is not None and max_images < 1:
        raise UnicomError(f"--max-images must be at least 1, got {max_images}")
    image_root = image_root.resolve()
    candidates = find_images(image_root)
    if not candidates:
        raise UnicomError(f"no images found under {image_root} ({HOW_TO_GET_IMAGES})")
    log.info("found %d images under %s", len(candidates), image_root)

    dropped: list[Dropped] = []

    def drop(cand: Candidate, reason: str, detail: str) -> None:
        dropped.append(Dropped(str(cand.path), reason, detail, cand.category))

    duplicates = duplicate_links(candidates)
    copies = duplicate_contents(candidates, set(duplicates))
    usable: list[Candidate] = []
    for i, cand in enumerate(tqdm(candidates, desc="image headers", unit="img", mininterval=2)):
        if i in duplicates:
            drop(cand, "duplicate_link", f"same file as {duplicates[i]}")
        elif i in copies:
            drop(cand, "duplicate_content", f"same bytes as {copies[i]}")
        elif not cand.category:
            drop(cand, "no_category", "image directly in the root folder, not in a category")
        elif problem := image_header_problem(cand.path):
            drop(cand, *problem)
        else:
            usable.append(cand)
    if not usable:
        raise UnicomError(f"no usable images under {image_root} ({HOW_TO_GET_IMAGES})")

    # Captions are built before the cap, so a capped pool has the same captions as the full one.
    metadata = [
        read_svg_metadata(svg_root / c.rel.with_suffix(".svg")) if svg_root else ("", [])
        for c in tqdm(usable, desc="svg metadata", unit="img", mininterval=2)
    ]
    generic = generic_titles((title for title, _ in metadata), GENERIC_TITLE_MIN_SHARE)
    all_rows = []
    for cand, (title, raw_tags) in zip(usable, metadata, strict=True):
        tags = normalize_tags(raw_tags, title)
        all_rows.append(
            {
                URL_COLUMN: cand.path.as_uri(),
                CAPTION_COLUMN: build_caption(title, tags, cand.path.stem, title in generic),
                "category": cand.category,
                "subcategory": cand.subcategory,
                "title": title,
                "tags": tags,
                "path": str(cand.path),
            }
        )

    keep = stratified_cap([c.category for c in usable], max_images, seed)
    rows = [r for r, k in zip(all_rows, keep, strict=True) if k]
    capped = [c for c, k in zip(usable, keep, strict=True) if not k]

    heldout_mask = stratified_heldout_mask(
        [r["category"] for r in rows],
        heldout_fraction,
        seed,
        groups=[variant_group(Path(r["path"])) for r in rows],
    )
    train_rows = [r for r, h in zip(rows, heldout_mask, strict=True) if not h]
    heldout_rows = [r for r, h in zip(rows, heldout_mask, strict=True) if h]

    summary = _summary(candidates, dropped, capped, train_rows, heldout_rows)
    summary.update(
        image_root=str(image_root),
        svg_root=None if svg_root is None else str(svg_root),
        heldout_fraction=heldout_fraction,
        max_images=max_images,
        seed=seed,
    )
    return PoolResult(_rows_table(train_rows), _rows_table(heldout_rows), dropped, summary)


def _summary(
    candidates: Sequence[Candidate],
    dropped: Sequence[Dropped],
    capped: Sequence[Candidate],
    train_rows: Sequence[dict],
    heldout_rows: Sequence[dict],
) -> dict:
    found = len(candidates)
    accounted = len(train_rows) + len(heldout_rows) + len(capped) + len(dropped)
    if accounted != found:  # a real check, not an assert: it must survive python -O
        raise RuntimeError(f"pool accounting is off: {accounted} accounted for, {found} found")
    per_category: dict[str, Counter] = {}

    def count(category: str, what: str) -> None:
        per_category.setdefault(category, Counter())[what] += 1

    for cand in candidates:
        count(cand.category, "found")
    for item in dropped:
        count(item.category, "dropped")
    for cand in capped:
        count(cand.category, "capped_out")
    for row in train_rows:
        count(row["category"], "train")
    for row in heldout_rows:
        count(row["category"], "heldout")
    keys = ("found", "dropped", "capped_out", "train", "heldout")
    return {
        "found": found,
        "dropped": dict(sorted(Counter(d.reason for d in dropped).items())),
        "dropped_total": len(dropped),
        "capped_out": len(capped),
        "train": len(train_rows),
        "heldout": len(heldout_rows),
        "per_category": {
            c: {k: per_category[c][k] for k in keys} for c in sorted(per_category, key=str)
        },
    }


def write_dropped(path: Path, dropped: Sequence[Dropped]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "reason", "detail"])
        for item in dropped:
            writer.writerow([item.path, item.reason, item.detail])
