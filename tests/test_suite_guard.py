"""The suite's own guard: a disk too small for the end-to-end tests stops it in one line."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO


def test_a_disk_too_small_stops_the_suite_before_any_test(tmp_path):
    env = {**os.environ, "UNICOM_TEST_FREE_GIB": "1e9"}  # more than any disk has
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--basetemp", str(tmp_path / "base"), "tests/test_layout.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert "not enough free disk for the tests under" in run.stdout + run.stderr
    assert "passed" not in run.stdout
