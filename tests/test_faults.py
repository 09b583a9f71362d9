"""The fault-injection hook that tests/test_slurm.py uses to break one shard once."""

from __future__ import annotations

import pytest

from unicom.errors import UnicomError
from unicom.faults import ENV_VAR, fail_once_if_marked, parse_marker


def test_marker_names_stage_and_part():
    assert parse_marker("embed 00001\n") == ("embed", "00001")
    with pytest.raises(UnicomError, match="expected '<stage> <part>'"):
        parse_marker("embed")


def test_fails_once_for_the_marked_shard_only(tmp_path):
    marker = tmp_path / "fail-once"
    marker.write_text("embed 00001")
    env = {ENV_VAR: str(marker)}
    fail_once_if_marked("embed", "00002", env)  # another shard
    fail_once_if_marked("fuse", "00001", env)  # another stage
    assert marker.exists()
    with pytest.raises(SystemExit) as exit_info:
        fail_once_if_marked("embed", "00001", env)
    assert exit_info.value.code == 1
    assert not marker.exists()
    fail_once_if_marked("embed", "00001", env)  # the retry runs


def test_does_nothing_without_the_variable(tmp_path):
    fail_once_if_marked("embed", "00001", {})
    fail_once_if_marked("embed", "00001", {ENV_VAR: str(tmp_path / "absent")})
