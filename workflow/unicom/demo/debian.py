"""Debian's openclipart and fashion-mnist packages without root: find them installed or in the
resources folder, else ``apt-get download`` + ``dpkg-deb -x``; and the JSON markers that record
where they are."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path

from unicom.demo.pool import HOW_TO_GET_IMAGES, find_images
from unicom.errors import UnicomError
from unicom.io import DIR_MODE, FILE_MODE, follow_umask
from unicom.planning import FASHION_MNIST_DIR, FASHION_MNIST_FILES

log = logging.getLogger("unicom.demo.debian")

CLIPART_PACKAGES = ("openclipart-png", "openclipart-svg")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
CLIPART_REL = Path("usr/share/openclipart")
FASHION_MNIST_REL = FASHION_MNIST_DIR.relative_to(FASHION_MNIST_DIR.anchor)
APT_TIMEOUT_S = 3600


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
        os.chmod(deb, FILE_MODE)  # apt-get sets its own mode (0644 under umask 002, as root)
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
    os.chmod(staging, DIR_MODE)
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
            # dpkg-deb keeps the package's modes (0644, 0755): a group that shares the
            # folder under umask 002 could not replace what it unpacked.
            follow_umask(staging / rel)
            os.replace(staging / rel, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _count_pngs(root: Path) -> int:
    return sum(1 for c in find_images(root) if c.path.suffix.lower() == ".png")


def fetch_sources(resources_dir: Path, system_root: Path, allow_download: bool) -> dict:
    """Find or download the packages; returns the marker's content."""
    resources_dir = resources_dir.resolve()
    deb_dir = resources_dir / "debs"
    versions: dict[str, str] = {}
    if roots := _clipart_roots(resources_dir):
        source = "resources_dir"
        versions.update(_versions_from_debs(deb_dir, CLIPART_PACKAGES))
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

    png_root, svg_root = roots
    return {
        "source": source,
        "png_root": str(png_root.resolve()),
        "svg_root": str(svg_root.resolve()),
        "versions": dict(sorted(versions.items())),
        "num_png": _count_pngs(png_root),
    }


def fetch_fashion_mnist(resources_dir: Path, allow_download: bool) -> dict:
    """Find under ``resources_dir`` or download (and unpack there) dataset-fashion-mnist;
    returns its marker's content. An installed package is used in place by the planning
    (demo.system_root), which asks for this copy only when there is none."""
    resources_dir = resources_dir.resolve()
    deb_dir = resources_dir / "debs"
    if folder := _fashion_mnist_dir(resources_dir):
        versions = _versions_from_debs(deb_dir, [FASHION_MNIST_PACKAGE])
    else:
        how = (
            f"apt-get install {FASHION_MNIST_PACKAGE}, or set evaluate.datasets.fashion-mnist to "
            "a folder with its four idx files (null: no Fashion-MNIST evaluation)"
        )
        if not allow_download:
            raise UnicomError(
                f"Fashion-MNIST not found under {resources_dir} (downloading disabled): {how}"
            )
        try:
            extract_debs(
                apt_download([FASHION_MNIST_PACKAGE], deb_dir), resources_dir, [FASHION_MNIST_REL]
            )
        except UnicomError as err:
            raise UnicomError(f"Fashion-MNIST could not be fetched ({err}): {how}") from None
        folder = _fashion_mnist_dir(resources_dir)
        if folder is None:
            raise UnicomError(
                f"{FASHION_MNIST_PACKAGE} did not unpack to {resources_dir / FASHION_MNIST_REL}: {how}"
            )
        versions = _versions_from_debs(deb_dir, [FASHION_MNIST_PACKAGE])
    return {"fashion_mnist_dir": str(folder.resolve()), "versions": versions}


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
