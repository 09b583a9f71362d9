"""Fault injection for rerun tests: make one stage fail once for one shard.

Set ``UNICOM_FAIL_ONCE`` to the path of a marker file holding ``<stage> <part>``, e.g.
``embed 00001``. A stage that calls :func:`fail_once_if_marked` at start, and whose stage and
part match the marker, deletes the marker (so the next attempt runs normally) and exits with
status 1, as a crashed job would. Without the variable -- every real run -- it does nothing.

It lets tests/test_slurm.py break a single shard of a real run on a real scheduler, then check
that the rerun redoes that shard and what depends on it, and nothing else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from unicom.errors import UnicomError

ENV_VAR = "UNICOM_FAIL_ONCE"
log = logging.getLogger("unicom.faults")


def parse_marker(text: str, path: str = ENV_VAR) -> tuple[str, str]:
    """``"embed 00001"`` -> ``("embed", "00001")``."""
    fields = text.split()
    if len(fields) != 2:
        raise UnicomError(f"fault marker {path}: expected '<stage> <part>', got {text.strip()!r}")
    return fields[0], fields[1]


def marker_matches(text: str, stage: str, part: str, path: str = ENV_VAR) -> bool:
    return parse_marker(text, path) == (stage, part)


def fail_once_if_marked(stage: str, part: str, env: Mapping[str, str] | None = None) -> None:
    """Exit with status 1 if the marker named by ``UNICOM_FAIL_ONCE`` names ``stage`` and ``part``.

    The marker is deleted before exiting; of two jobs racing for it, only the one whose
    ``unlink`` succeeds fails.
    """
    env = os.environ if env is None else env
    marker = env.get(ENV_VAR)
    if not marker:
        return
    try:
        text = Path(marker).read_text()
    except FileNotFoundError:
        return  # already used: this is the retry
    if not marker_matches(text, stage, part, marker):
        return
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return
    log.error("%s of part %s: failing once on purpose (%s=%s)", stage, part, ENV_VAR, marker)
    raise SystemExit(1)
