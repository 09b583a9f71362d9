"""DataLoader workers of the stages that decode images (embed, train): how they start, how their
errors come back, and how they stop."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from unicom.errors import UnicomError

# Decoding workers run below the model's threads (see decoding_worker).
WORKER_NICENESS = 10


def decoding_worker(_: int) -> None:
    """``worker_init_fn`` of embedding: workers share the cores with the encoder's threads: one
    thread each, and a lower priority so they fill the gaps the encoder leaves (tokenising,
    Python glue) rather than stall its threads; when the encoder waits they run at full speed."""
    torch.set_num_threads(1)
    os.nice(WORKER_NICENESS)


def training_worker(_: int) -> None:
    """``worker_init_fn`` of training: one thread each, as above. The training process handles
    SIGTERM/SIGUSR1 (checkpoint, then exit); a worker killed by them would take the step down
    with it, so workers ignore them (they exit with their parent)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def worker_error_line(err: BaseException) -> str:
    """A worker's UnicomError comes back inside a traceback; keep its own last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else str(err)
    return last.removeprefix(f"{UnicomError.__module__}.{UnicomError.__name__}: ")


def iterate(loader: DataLoader) -> Iterator[Any]:
    """The loader's items; a worker's UnicomError is re-raised as its own one line, and the
    workers are stopped when the caller stops (left to garbage collection after an error, the
    DataLoader waits 5 s for them)."""
    iterator = iter(loader)
    try:
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except UnicomError as err:
                raise UnicomError(worker_error_line(err)) from None
            yield item
    finally:
        # No public API; the method is a no-op without workers.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
