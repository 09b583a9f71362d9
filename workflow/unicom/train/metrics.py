"""The metrics line of every ``log_every`` steps (metrics.jsonl): the mean loss, the rates, the
head's sampling, and where the time went, so that a loader-bound run does not look like a
compute-bound one: waiting for the loader's next batch (``data_wait_s``), or in the steps
(``step_s``, up to the moment the window's last step has finished on the device)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from unicom import distributed
from unicom.train.trainer import Trainer

if TYPE_CHECKING:
    from unicom.train.loop import Run


class MetricsWindow:
    """Loss and throughput over the steps since the last metrics line, and where the time went:
    waiting for the loader, or in the steps (checkpoint saves are left out of both)."""

    def __init__(self, run: Run):
        self.run = run
        self.loss = torch.zeros((), device=run.device)
        self.reset()

    def reset(self) -> None:
        self.steps, self.waited, self.excluded = 0, 0.0, 0.0  # excluded: checkpoint saves
        self.start = time.perf_counter()

    def add(self, result: Mapping[str, Any], waited: float) -> None:
        self.loss += result["loss"]
        self.steps += 1
        self.waited += waited

    def record(self, done: int, result: Mapping[str, Any], trainer: Trainer) -> dict[str, Any]:
        """The metrics line of step ``done`` (collective); rank 0 appends it to the live file."""
        loss = float(self.loss.item()) / self.steps  # waits for the window's last step
        seconds = time.perf_counter() - self.start - self.excluded
        # Every rank's head shard of this step (r1 < 1 shows in negatives < all) and its share
        # of time waiting for data: one starved rank holds every other one up.
        shares = distributed.all_gather_objects((*trainer.head_selection(), self.waited / seconds))
        samples_per_step, total = self.run.samples_per_step, self.run.data.total_samples
        record = {
            "step": done,
            "loss": loss,
            "lr": result["lr"],
            "head_lr": result["head_lr"],
            "grad_norm": float(result["grad_norm"].item()),
            "samples_per_s": self.steps * samples_per_step / seconds,
            "data_wait_s": self.waited / self.steps,
            "step_s": (seconds - self.waited) / self.steps,
            "data_wait_share": max(share for _, _, share in shares),
            "epoch": done * samples_per_step / total,
            "head_prototypes": sum(n for n, _, _ in shares),
            "head_negatives": sum(n - p for n, p, _ in shares),
        }
        if self.run.info.rank == 0:
            with open(self.run.live_metrics, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        self.loss.zero_()
        self.reset()
        return record
