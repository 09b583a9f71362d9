"""SIGTERM / SIGUSR1 (SLURM's warning before the time limit): checkpoint at the next step
boundary, then exit with 128 + the signal number so that the job counts as failed and a rerun
resumes."""

from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger("unicom.train.signals")


class StopRequest:
    """Remembers SIGTERM / SIGUSR1; the loop checks at each step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        log.warning("received %s: checkpoint at the end of this step, then exit", signum)

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainingInterrupted(Exception):
    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} after step {step}")
        self.signum = signum
        self.step = step
