"""The offline demo pool: openclipart images with captions from their SVG metadata.

Two sub-commands:

- ``fetch``: make Debian's ``openclipart-png`` / ``openclipart-svg`` (and ``dataset-fashion-mnist``,
  used later for evaluation) available without root, and record where they are in a JSON marker.
- ``pool``: turn the images into a LAION-style URL list (``file://`` URLs + captions) with a
  held-out split by image, stratified by category. Every image found is accounted for: train,
  held out, capped out, or dropped with a reason.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import warnings
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from unicom.cli import run_cli, setup_logging
from unicom.errors import UnicomError
from unicom.formats import CAPTION_COLUMN, URL_COLUMN
from unicom.io import atomic_path, write_json, write_parquet

log = logging.getLogger("unicom.demo.build")

CLIPART_PACKAGES = ("openclipart-png", "openclipart-svg")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
CLIPART_REL = Path("usr/share/openclipart")
FASHION_MNIST_REL = Path("usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
# openclipart's curation placeholder, not a description of the picture.
PLACEHOLDER_TAGS = frozenset({"unsorted"})
APT_TIMEOUT_S = 3600
# A title on this many pictures or more names a collection (e.g. 'Lemon SVG theme').
GENERIC_TITLE_MIN_SHARE = 5

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

# Salts keep the cap and the held-out split independent draws for the same seed.
_CAP_SALT = 1
_HELDOUT_SALT = 2


# --------------------------------------------------------------------------- SVG metadata


def _local(tag: str) -> str:
    """'{namespace}title' -> 'title'."""
    return tag.rsplit("}", 1)[-1]


def _clean_text(text: str | None) -> str:
    # Some files escape entities twice (&amp;quot;), so unescape once more after XML parsing.
    return " ".join(html.unescape(text or "").split())


def _metadata_from_events(parser: ET.XMLPullParser, state: dict) -> bool:
    """Consume parser events into ``state``; True once </metadata> has been seen."""
    for event, elem in parser.read_events():
        name = _local(elem.tag)
        if event == "start":
            state["stack"].append(name)
            continue
        state["stack"].pop()
        stack = state["stack"]
        if name == "metadata":
            return True
        if "metadata" not in stack:
            continue
        if name == "title" and state["title"] is None and "Agent" not in stack:
            state["title"] = _clean_text(elem.text)
        elif name == "li" and "subject" in stack:
            state["tags"].append(_clean_text(elem.text))
        elif name == "subject" and len(elem) == 0 and elem.text and elem.text.strip():
            # Plain <dc:subject>a, b</dc:subject> without an rdf:Bag.
            state["tags"].extend(_clean_text(t) for t in elem.text.split(","))
    return False


_AGENT_RE = re.compile(r"<(\w+:)?Agent\b.*?</(\w+:)?Agent>", re.S)
_TITLE_RE = re.compile(r"<(?:\w+:)?title\b[^>]*>(.*?)</(?:\w+:)?title>", re.S)
_SUBJECT_RE = re.compile(r"<(?:\w+:)?subject\b[^>]*>(.*?)</(?:\w+:)?subject>", re.S)
_LI_RE = re.compile(r"<(?:\w+:)?li\b[^>]*>(.*?)</(?:\w+:)?li>", re.S)
_TAG_RE = re.compile(r"<[^>]*>")


_METADATA_START_RE = re.compile(r"<(?:\w+:)?metadata\b")
_METADATA_END_RE = re.compile(r"</(?:\w+:)?metadata\s*>")
_METADATA_END_BYTES_RE = re.compile(rb"</(?:\w+:)?metadata\s*>")


def _metadata_by_regex(text: str) -> tuple[str, list[str]]:
    """Best-effort fallback for SVGs that are not well-formed XML."""
    start = _METADATA_START_RE.search(text)
    if start is None:
        return "", []
    end = _METADATA_END_RE.search(text, start.end())
    block = text[start.end() : end.start() if end else len(text)]
    without_agents = _AGENT_RE.sub("", block)
    title_match = _TITLE_RE.search(without_agents)
    title = _clean_text(_TAG_RE.sub("", title_match.group(1))) if title_match else ""
    tags: list[str] = []
    subject = _SUBJECT_RE.search(block)
    if subject:
        items = _LI_RE.findall(subject.group(1)) or subject.group(1).split(",")
        tags = [_clean_text(_TAG_RE.sub("", item)) for item in items]
    return title, tags


def _metadata_from_chunks(chunks: Iterable[bytes | str]) -> tuple[str, list[str]]:
    """Parse chunks until </metadata>, so the (large) drawing after it is never read."""
    parser = ET.XMLPullParser(events=("start", "end"))
    state: dict = {"stack": [], "title": None, "tags": []}
    chunks = iter(chunks)
    seen: list[bytes] = []
    try:
        for chunk in chunks:
            seen.append(chunk if isinstance(chunk, bytes) else chunk.encode())
            parser.feed(chunk)
            if _metadata_from_events(parser, state):
                break
        else:
            parser.close()
            _metadata_from_events(parser, state)
    except ET.ParseError:
        # Read on to the end of the metadata (or of the file), then scan the text.
        while (
            not _METADATA_END_BYTES_RE.search(b"".join(seen[-2:]))
            and (chunk := next(chunks, None)) is not None
        ):
            seen.append(chunk if isinstance(chunk, bytes) else chunk.encode())
        return _metadata_by_regex(b"".join(seen).decode("utf-8", errors="replace"))
    return state["title"] or "", state["tags"]


def parse_svg_metadata(data: bytes | str) -> tuple[str, list[str]]:
    """SVG text -> (dc:title of the work, raw keyword tags from dc:subject).

    The title is the first ``dc:title`` inside ``<metadata>`` that is not an agent's name
    (publisher/creator/rights). Malformed XML falls back to a regex scan; a file without
    metadata gives ``("", [])``. Never raises on bad content.
    """
    return _metadata_from_chunks([data])


def _file_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


def read_svg_metadata(path: Path, chunk_size: int = 16384) -> tuple[str, list[str]]:
    """Like ``parse_svg_metadata`` but reads the file only up to the end of its metadata."""
    try:
        return _metadata_from_chunks(_file_chunks(path, chunk_size))
    except OSError as err:
        log.debug("cannot read %s: %s", path, err)
        return "", []


# --------------------------------------------------------------------------- captions


def words_from_stem(stem: str) -> str:
    """'chemistry_flask_matthew__02' -> 'chemistry flask matthew' (numbering dropped)."""
    words = [w for w in re.split(r"[\s_\-.]+", stem) if w and not w.isdigit()]
    return " ".join(words) if words else stem.strip()


def normalize_tags(tags: Iterable[str], title: str = "") -> list[str]:
    """Readable, unique, non-empty tags; a tag repeating the title adds nothing."""
    seen = {title.casefold()} if title else set()
    result = []
    for tag in tags:
        tag = " ".join(tag.replace("_", " ").split())
        key = tag.casefold()
        if not tag or key in seen or key in PLACEHOLDER_TAGS:
            continue
        seen.add(key)
        result.append(tag)
    return result


def build_caption(title: str, tags: Iterable[str], stem: str, generic_title: bool = False) -> str:
    """'scale' + ['', 'tool', 'mass', 'scale', 'work'] -> 'scale: tool, mass, work'.

    Without a title, words from the file name stand in for it. A ``generic_title`` (a
    collection name shared by many pictures, e.g. 'Lemon SVG theme') says little about this
    picture, so the file name's words lead and the title follows in brackets.
    """
    title = _clean_text(title)
    head = title or words_from_stem(stem)
    if title and generic_title:
        named = words_from_stem(stem)
        head = title if named.casefold() == title.casefold() else f"{named} ({title})"
    kept = normalize_tags(tags, title or head)
    return f"{head}: {', '.join(kept)}" if kept else head


def generic_titles(titles: Iterable[str], min_share: int) -> set[str]:
    """Titles carried by at least ``min_share`` pictures: collection names, not descriptions."""
    counts = Counter(t for t in titles if t)
    return {t for t, n in counts.items() if n >= min_share}


# --------------------------------------------------------------------------- sampling


def _category_rng(seed: int, salt: int, category: str) -> np.random.Generator:
    # Seeded per category, so one category's draw does not depend on which others exist.
    return np.random.default_rng([seed, salt, zlib.crc32(category.encode())])


def _indices_by_category(categories: Sequence[str]) -> dict[str, np.ndarray]:
    groups: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        groups.setdefault(category, []).append(i)
    return {c: np.asarray(groups[c]) for c in sorted(groups)}


def proportional_quotas(counts: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` across categories in proportion to ``counts`` (largest remainder)."""
    size = sum(counts.values())
    if total >= size:
        return dict(counts)
    exact = {c: total * n / size for c, n in counts.items()}
    quotas = {c: int(q) for c, q in exact.items()}
    by_remainder = sorted(counts, key=lambda c: (-(exact[c] - quotas[c]), c))
    for c in by_remainder[: total - sum(quotas.values())]:
        quotas[c] += 1
    return quotas


def stratified_cap(categories: Sequence[str], max_n: int | None, seed: int) -> np.ndarray:
    """Boolean mask keeping at most ``max_n`` items, each category in proportion to its size."""
    keep = np.zeros(len(categories), dtype=bool)
    groups = _indices_by_category(categories)
    if max_n is None or max_n >= len(categories):
        keep[:] = True
        return keep
    quotas = proportional_quotas({c: len(ix) for c, ix in groups.items()}, max_n)
    for category, indices in groups.items():
        chosen = _category_rng(seed, _CAP_SALT, category).permutation(indices)[: quotas[category]]
        keep[chosen] = True
    return keep


def heldout_count(n: int, fraction: float) -> int:
    """Images held out of a category of ``n``: rounded share, always leaving one for training."""
    return max(0, min(int(n * fraction + 0.5), n - 1))


def stratified_heldout_mask(categories: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out items: about ``fraction`` of each category, seeded."""
    heldout = np.zeros(len(categories), dtype=bool)
    for category, indices in _indices_by_category(categories).items():
        k = heldout_count(len(indices), fraction)
        chosen = _category_rng(seed, _HELDOUT_SALT, category).permutation(indices)[:k]
        heldout[chosen] = True
    return heldout


# --------------------------------------------------------------------------- pool


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
    usable: list[Candidate] = []
    for i, cand in enumerate(tqdm(candidates, desc="image headers", unit="img", mininterval=2)):
        if i in duplicates:
            drop(cand, "duplicate_link", f"same file as {duplicates[i]}")
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

    heldout_mask = stratified_heldout_mask([r["category"] for r in rows], heldout_fraction, seed)
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


def read_source_marker(path: Path) -> tuple[Path, Path]:
    """Marker written by ``fetch`` -> (png root, svg root)."""
    try:
        marker = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UnicomError(f"cannot read source marker {path}: {err}") from None
    roots = []
    for key in ("png_root", "svg_root"):
        value = marker.get(key) if isinstance(marker, dict) else None
        if not value or not Path(value).is_dir():
            raise UnicomError(
                f"source marker {path}: key {key!r} is {value!r}, not an existing folder "
                "(run `python -m unicom.demo.build fetch` again)"
            )
        roots.append(Path(value))
    return roots[0], roots[1]


# --------------------------------------------------------------------------- fetch


def _clipart_roots(base: Path) -> tuple[Path, Path] | None:
    png, svg = base / CLIPART_REL / "png", base / CLIPART_REL / "svg"
    return (png, svg) if png.is_dir() and svg.is_dir() else None


def _fashion_mnist_dir(base: Path) -> Path | None:
    folder = base / FASHION_MNIST_REL
    return folder if all((folder / name).is_file() for name in FASHION_MNIST_FILES) else None


def deb_version(deb_name: str) -> tuple[str, str] | None:
    """'openclipart-png_1%3a0.18+dfsg-19_all.deb' -> ('openclipart-png', '1:0.18+dfsg-19')."""
    parts = deb_name.removesuffix(".deb").split("_")
    if len(parts) != 3 or not deb_name.endswith(".deb"):
        return None
    return parts[0], urllib.parse.unquote(parts[1])


def _newest_deb(deb_dir: Path, package: str) -> Path | None:
    debs = [p for p in deb_dir.glob(f"{package}_*.deb") if deb_version(p.name)]
    return max(debs, key=lambda p: p.stat().st_mtime) if debs else None


def _versions_from_debs(deb_dir: Path, packages: Iterable[str]) -> dict[str, str]:
    versions = {}
    for package in packages:
        deb = _newest_deb(deb_dir, package) if deb_dir.is_dir() else None
        if deb is not None:
            versions[package] = deb_version(deb.name)[1]
    return versions


def _installed_versions(packages: Iterable[str]) -> dict[str, str]:
    if shutil.which("dpkg-query") is None:
        return {}
    versions = {}
    for package in packages:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0 and result.stdout.strip():
            versions[package] = result.stdout.strip()
    return versions


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def apt_download(packages: Sequence[str], deb_dir: Path) -> list[Path]:
    """``apt-get download`` (no root needed) into ``deb_dir``; the .deb files it produced."""
    if shutil.which("apt-get") is None:
        raise UnicomError("apt-get is not available")
    deb_dir.mkdir(parents=True, exist_ok=True)
    log.info("apt-get download %s (into %s)", " ".join(packages), deb_dir)
    try:
        result = subprocess.run(
            ["apt-get", "download", *packages],
            cwd=deb_dir,
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UnicomError(f"apt-get download timed out after {APT_TIMEOUT_S} s") from None
    # Run as root, apt warns that the '_apt' user cannot write here: harmless.
    for line in result.stderr.splitlines():
        log.debug("apt-get: %s", line)
    if result.returncode != 0:
        reason = _last_line(result.stderr) or f"exit code {result.returncode}"
        raise UnicomError(f"apt-get download {' '.join(packages)} failed: {reason}")
    debs = []
    for package in packages:
        deb = _newest_deb(deb_dir, package)
        if deb is None:
            raise UnicomError(f"apt-get download left no {package}_*.deb in {deb_dir}")
        debs.append(deb)
    return debs


def extract_debs(debs: Sequence[Path], dest: Path, wanted: Sequence[Path]) -> None:
    """``dpkg-deb -x`` into a staging folder, then move each ``wanted`` folder into ``dest``.

    Moving whole folders at the end means a folder that exists is complete: an interrupted
    extraction leaves only the staging folder behind.
    """
    if shutil.which("dpkg-deb") is None:
        raise UnicomError("dpkg-deb is not available to unpack the downloaded packages")
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract.", suffix=".tmp", dir=dest))
    try:
        for deb in debs:
            log.info("dpkg-deb -x %s", deb.name)
            result = subprocess.run(
                ["dpkg-deb", "-x", str(deb), str(staging)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise UnicomError(f"dpkg-deb -x {deb} failed: {_last_line(result.stderr)}")
        for rel in wanted:
            if not (staging / rel).is_dir():
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / rel, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _count_pngs(root: Path) -> int:
    return sum(1 for c in find_images(root) if c.path.suffix.lower() == ".png")


def fetch_sources(resources_dir: Path, system_root: Path, allow_download: bool) -> dict:
    """Find or download the packages; returns the marker's content."""
    resources_dir = resources_dir.resolve()
    deb_dir = resources_dir / "debs"
    packages = [*CLIPART_PACKAGES, FASHION_MNIST_PACKAGE]
    versions: dict[str, str] = {}
    if roots := _clipart_roots(resources_dir):
        source = "resources_dir"
        versions.update(_versions_from_debs(deb_dir, packages))
    elif roots := _clipart_roots(system_root):
        source = "system"
        versions.update(_installed_versions(CLIPART_PACKAGES))
    elif not allow_download:
        raise UnicomError(
            f"openclipart images not found under {resources_dir / CLIPART_REL} or "
            f"{system_root / CLIPART_REL} (downloading disabled): {HOW_TO_GET_IMAGES}"
        )
    else:
        try:
            debs = apt_download(list(CLIPART_PACKAGES), deb_dir)
            extract_debs(debs, resources_dir, [CLIPART_REL / "png", CLIPART_REL / "svg"])
        except UnicomError as err:
            raise UnicomError(
                f"openclipart images not found and could not be downloaded ({err}): "
                f"{HOW_TO_GET_IMAGES}"
            ) from None
        roots = _clipart_roots(resources_dir)
        if roots is None:
            raise UnicomError(
                f"the openclipart packages did not unpack to {resources_dir / CLIPART_REL}: "
                f"{HOW_TO_GET_IMAGES}"
            )
        source = "apt"
        versions.update(_versions_from_debs(deb_dir, CLIPART_PACKAGES))

    fashion = _fashion_mnist_dir(resources_dir) or _fashion_mnist_dir(system_root)
    if fashion is None and allow_download:
        # Only needed for evaluation: a failure here is a warning, not an error.
        try:
            debs = apt_download([FASHION_MNIST_PACKAGE], deb_dir)
            extract_debs(debs, resources_dir, [FASHION_MNIST_REL])
            fashion = _fashion_mnist_dir(resources_dir)
            versions.update(_versions_from_debs(deb_dir, [FASHION_MNIST_PACKAGE]))
        except UnicomError as err:
            log.warning("fashion-mnist unavailable: %s", err)
    if fashion is None:
        log.warning(
            "fashion-mnist not found (apt-get install %s for the evaluation)", FASHION_MNIST_PACKAGE
        )
    elif fashion.is_relative_to(system_root) and not fashion.is_relative_to(resources_dir):
        versions.update(_installed_versions([FASHION_MNIST_PACKAGE]))

    png_root, svg_root = roots
    return {
        "source": source,
        "png_root": str(png_root.resolve()),
        "svg_root": str(svg_root.resolve()),
        "fashion_mnist_dir": None if fashion is None else str(fashion.resolve()),
        "versions": dict(sorted(versions.items())),
        "num_png": _count_pngs(png_root),
    }


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser = argparse.ArgumentParser(
        prog="python -m unicom.demo.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser(
        "fetch", parents=[common], help="make the openclipart packages available"
    )
    fetch.add_argument("--resources-dir", type=Path, required=True)
    fetch.add_argument("--out", type=Path, required=True, help="JSON marker to write")
    fetch.add_argument(
        "--system-root", type=Path, default=Path("/"), help="where installed packages live"
    )
    fetch.add_argument(
        "--no-download", action="store_true", help="never call apt-get; fail if not found"
    )

    pool = sub.add_parser("pool", parents=[common], help="build the URL list and held-out split")
    source = pool.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", type=Path, help="marker written by fetch")
    source.add_argument("--image-dir", type=Path, help="folder with one subfolder per category")
    pool.add_argument("--out-urls", type=Path, required=True)
    pool.add_argument("--out-heldout", type=Path, required=True)
    pool.add_argument("--out-dropped", type=Path, required=True)
    pool.add_argument("--out-summary", type=Path, required=True)
    pool.add_argument("--heldout-fraction", type=float, default=0.1)
    pool.add_argument("--max-images", type=int, default=None)
    pool.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    started = time.perf_counter()
    if args.command == "fetch":
        marker = fetch_sources(args.resources_dir, args.system_root, not args.no_download)
        write_json(args.out, marker)
        log.info(
            "%d PNGs at %s (source: %s)", marker["num_png"], marker["png_root"], marker["source"]
        )
        return

    if args.source is not None:
        image_root, svg_root = read_source_marker(args.source)
    else:
        if not args.image_dir.is_dir():
            raise UnicomError(f"--image-dir {args.image_dir} is not a folder")
        image_root, svg_root = args.image_dir, None
    result = build_pool(image_root, svg_root, args.heldout_fraction, args.max_images, args.seed)
    result.summary["seconds"] = round(time.perf_counter() - started, 2)
    write_parquet(args.out_urls, result.train)
    write_parquet(args.out_heldout, result.heldout)
    write_dropped(args.out_dropped, result.dropped)
    write_json(args.out_summary, result.summary)
    s = result.summary
    log.info(
        "found %d: train %d, held out %d, capped out %d, dropped %d %s (%.1f s)",
        s["found"],
        s["train"],
        s["heldout"],
        s["capped_out"],
        s["dropped_total"],
        s["dropped"],
        s["seconds"],
    )


if __name__ == "__main__":
    run_cli(main)
