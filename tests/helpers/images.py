"""Small real images, written on the fly: class-coloured shapes, and a small Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# The small pool of the end-to-end tests (the ``small_image_folder`` fixture, and
# tests/fixtures/small_images for a run by hand): 4 categories x 12 images.
SMALL_POOL = {"apples": 12, "boats": 12, "cubes": 12, "doors": 12}


def make_image_folder(
    root: Path, categories: dict[str, int], size: int = 96, seed: int = 0
) -> Path:
    """Write PNGs into ``root/<category>/`` -- each category its own colour and shape."""
    rng = np.random.default_rng(seed)
    shapes = ["ellipse", "rectangle", "polygon", "line"]
    for c, (category, count) in enumerate(sorted(categories.items())):
        folder = root / category
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(60 * c) % 256, (130 + 50 * c) % 256, (200 - 40 * c) % 256])
        for i in range(count):
            image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
            draw = ImageDraw.Draw(image)
            colour = tuple(int(v) for v in np.clip(base + rng.integers(-20, 20, 3), 0, 255))
            x0, y0 = (int(v) for v in rng.integers(5, size // 3, 2))
            x1, y1 = (int(v) for v in rng.integers(2 * size // 3, size - 5, 2))
            shape = shapes[c % len(shapes)]
            if shape == "polygon":
                draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
            elif shape == "line":
                draw.line([(x0, y0), (x1, y1)], fill=colour, width=8)
            else:
                getattr(draw, shape)([x0, y0, x1, y1], fill=colour)
            image.save(folder / f"{category}_{shape}_{i:02d}.png")
    return root


def write_idx(path: Path, array: np.ndarray, magic_type: int = 0x08) -> None:
    """An idx file (MNIST's format), gzipped as Debian ships them."""
    import gzip
    import struct

    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    # mtime 0: the same bytes every time (tests/fixtures/system is committed)
    with gzip.GzipFile(path, "wb", mtime=0) as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def install_fashion_mnist(system_root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """A small Fashion-MNIST in Debian's layout under ``system_root`` (what
    dataset-fashion-mnist installs under /): 10 classes x ``per_class`` 28x28 images, each class
    a brightness band, in both splits."""
    folder = system_root / "usr/share/datasets/fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    for split in ("train", "t10k"):
        images = rng.integers(0, 40, (len(labels), 28, 28)) + 20 * labels[:, None, None]
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder
