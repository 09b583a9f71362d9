"""Checkpoints that resume exactly: every rank writes its own file into a hidden folder that rank
0 renames into place, so a visible ``step-NNNNNNNN`` folder is always complete; a checkpoint
remembers the settings and data it was written with and refuses another run."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from unicom import distributed
from unicom.errors import UnicomError
from unicom.train.inputs import RankData
from unicom.train.trainer import Trainer

log = logging.getLogger("unicom.train.checkpoint")


# Keys that may change between a checkpoint and its resumption; any other change is refused,
# because the resumed run would no longer be the run that wrote the checkpoint.
RESUMABLE_KEYS = frozenset(
    {
        "num_workers",
        "compile",
        "fused_optimizer",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "device",
        "nproc_per_node",
        "nodes",
    }
)


CHECKPOINT_FORMAT = 1


CHECKPOINTS = "checkpoints"


CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-NNNNNNNN``; unfinished ones are ``.step-*.tmp``), by step."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(
    root: Path,
    step: int,
    trainer: Trainer,
    header: Mapping[str, Any],
    extra_rank_state: Mapping[str, Any],
    keep: int,
) -> Path:
    """Every rank writes its file into a hidden folder; rank 0 then renames the folder into
    place (atomic), so a checkpoint folder with a visible name is always complete."""
    rank = trainer.info.rank
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    torch.save(
        {**header, "rank": rank, **trainer.rank_state(), **extra_rank_state},
        tmp / f"rank-{rank:05d}.pt",
    )
    if rank == 0:
        torch.save({**header, **trainer.shared_state()}, tmp / "model.pt")
    distributed.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in checkpoint_dirs(root)[: -keep or None] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _load_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UnicomError(f"checkpoint file {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnicomError(
            f"checkpoint {path} is corrupt ({first}); delete its folder to resume from an "
            "earlier checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UnicomError(f"checkpoint {path} is not a unicom.train checkpoint")
    return state


def check_signature(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise UnicomError(
                f"checkpoint {path} was written by a different run: {key} is "
                f"{json.dumps(saved.get(key))[:80]} there but {json.dumps(current.get(key))[:80]} "
                f"now; restore the setting or delete {path.parent} to start over"
            )


def load_checkpoint(
    path: Path, rank: int, signature: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    shared = _load_file(path / "model.pt")
    check_signature(path, shared.get("signature", {}), signature)
    own = _load_file(path / f"rank-{rank:05d}.pt")
    if own.get("step") != shared.get("step") or own.get("rank") != rank:
        raise UnicomError(f"checkpoint {path}: rank-{rank:05d}.pt does not belong with model.pt")
    return shared, own


def set_aside_other_runs(root: Path, signature: Mapping[str, Any]) -> None:
    """Move ``root`` aside when its latest checkpoint was written with another signature."""
    found = checkpoint_dirs(root)
    if not found:
        return
    latest = found[-1][1]
    try:
        check_signature(latest, _load_file(latest / "model.pt").get("signature", {}), signature)
    except UnicomError as err:
        stale = root.with_name(f"{root.name}-stale-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(root, stale)
        log.warning("%s; moved to %s, training starts over", err, stale)


def run_signature(
    options: Mapping[str, Any], num_classes: int, world: int, data: RankData
) -> dict[str, Any]:
    signature = {f"train.{k}": v for k, v in options.items() if k not in RESUMABLE_KEYS}
    signature.update(
        {"num_classes": num_classes, "world_size": world, "data_streams": data.streams}
    )
    signature["data"] = data.signature()
    return signature
