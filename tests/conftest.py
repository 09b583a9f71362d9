"""Shared test fixtures: small real image folders built on the fly."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two ranks of one node under real torchrun (append `-m <module> ...`).
TORCHRUN_TWO_RANKS = [
    sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"
]  # fmt: skip


# Longest modules first: under `make test` (pytest -n 2 --dist loadfile) each file runs whole on
# one of two workers, and the SLURM module, which mostly waits for the scheduler's status
# checks, then overlaps with the rest instead of running alone at the end.
LONG_MODULES = (
    "test_slurm.py",
    "test_rehearsal.py",
    "test_workflow.py",
    "test_hygiene_workflow.py",
    "test_hard_kill.py",
)


# The end-to-end tests hold ~2.7 GiB of /tmp at their peak (the rehearsal's ViT-B/16
# checkpoint and exported model alone are 1.4 GiB); a full disk otherwise shows up as dozens
# of unrelated setup errors.
# UNICOM_TEST_FREE_GIB changes the floor (0 skips the check, e.g. for `-m "not slow"` alone).
NEEDED_FREE_GIB = float(os.environ.get("UNICOM_TEST_FREE_GIB", "4"))


def pytest_sessionstart(session) -> None:
    """Stop at once, in one line, when the temporary folder's disk cannot hold the suite."""
    if hasattr(session.config, "workerinput"):  # xdist workers: the controller checked already
        return
    import shutil
    import tempfile

    root = session.config.option.basetemp or tempfile.gettempdir()
    while not os.path.exists(root):
        root = os.path.dirname(root) or "."
    free_gib = shutil.disk_usage(root).free / 2**30
    if free_gib < NEEDED_FREE_GIB:
        pytest.exit(
            f"not enough free disk for the tests under {root}: {free_gib:.1f} GiB free, "
            f"{NEEDED_FREE_GIB:g} GiB needed (free space, or point TMPDIR elsewhere)",
            returncode=2,
        )


def pytest_collection_modifyitems(items) -> None:
    """Stable sort: the order of tests inside a module is kept (some depend on it)."""

    def rank(item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_gloo(rank: int, world: int, port: int) -> None:
    """One thread, and a gloo process group on loopback: a rank spawned by a test."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def spawn_ranks(worker, world: int, out_dir: str, what: str, timeout: float = 120) -> None:
    """``worker(rank, world, port, out_dir)`` on ``world`` spawned processes (each joins gloo
    with ``join_gloo``); kills them and fails the test after ``timeout`` seconds."""
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} did not finish in {timeout:g} s")


def head_steps(head, batch, labels, steps: int) -> list[dict]:
    """``steps`` forward/backward passes of a PartialFC ``head`` on ``batch()`` (a fresh leaf
    each step) and ``labels``; what each step computed and selected."""
    recorded = []
    for _ in range(steps):
        head.zero_grad()
        embeddings = batch().requires_grad_(True)
        loss = head(embeddings, labels)
        loss.backward()
        grad = head.weight.grad
        recorded.append(
            {
                "loss": loss.detach(),
                "embedding_grad": embeddings.grad,
                "weight_grad": grad.to_dense() if grad.is_sparse else grad,
                "classes": head.last_selected_classes,
                "dims": head.last_selected_dims,
            }
        )
    return recorded


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
    with gzip.open(path, "wb") as handle:
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


@contextlib.contextmanager
def loopback_http(handler: type[BaseHTTPRequestHandler], stop: threading.Event) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 (a free port) for ``handler``; yields its base URL.
    ``stop`` is set before the shutdown, so that handlers that stall on purpose return."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    assert not thread.is_alive()


@pytest.fixture(scope="session")
def small_image_folder(tmp_path_factory) -> Path:
    """4 categories x 12 images."""
    root = tmp_path_factory.mktemp("images")
    return make_image_folder(root, {"apples": 12, "boats": 12, "cubes": 12, "doors": 12})
