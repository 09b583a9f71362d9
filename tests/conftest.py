"""pytest's hooks (the free-disk guard, the order of the files) and the shared fixtures; what
test files import lives in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.images import SMALL_POOL, make_image_folder

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.fixture(scope="session")
def small_image_folder(tmp_path_factory) -> Path:
    """4 categories x 12 images."""
    root = tmp_path_factory.mktemp("images")
    return make_image_folder(root, SMALL_POOL)
