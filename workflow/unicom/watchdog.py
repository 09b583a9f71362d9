"""A stage ends when the Snakemake process that runs it is gone.

A hard kill of Snakemake (SIGKILL, the OOM killer, a closed terminal without its process
group) leaves its local jobs running, orphaned: they hold the machine, and may write their
outputs while the rerun redoes the same job. The Snakefile therefore exports
``UNICOM_SCHEDULER`` (``shell_export``) in every job's shell prefix, naming the process that
starts the jobs; ``run_cli`` (every stage) calls ``watch``, whose daemon thread checks it once a
second and, once it is gone, stops the stage the way SIGTERM would: a stage that handles SIGTERM
(training checkpoints and exits, so that the rerun resumes) gets the signal and
``GRACE_S`` seconds; any other dies at once, its worker processes (img2dataset's, ...) first.

No-op when the variable is unset (a stage run by hand) and when the named process is not in
this process's view: another host (ranks started by srun on other nodes) or another PID
namespace (a container). SLURM ends a job's steps when its batch script ends, and a SLURM job
outlives a killed login-node Snakemake by design: ``squeue`` / ``scancel`` find and end it.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from unicom.errors import UnicomError

ENV_VAR = "UNICOM_SCHEDULER"
POLL_S = 1.0
# How long a stage that handles SIGTERM may take to stop (finish its step, save a checkpoint)
# before it and its workers are killed.
GRACE_S = 300.0
PROC = Path("/proc")

log = logging.getLogger("unicom.watchdog")


@dataclass(frozen=True)
class Scheduler:
    """A process as this machine knows it: host, PID namespace, pid and start time (the last
    two together tell it from a later process given the same pid)."""

    host: str
    namespace: str
    pid: int
    start: str

    def __str__(self) -> str:
        return ":".join([self.host, self.namespace, str(self.pid), self.start])

    @classmethod
    def parse(cls, text: str) -> Scheduler:
        try:
            host, namespace, pid, start = text.rsplit(":", 3)
            return cls(host, namespace, int(pid), start)
        except ValueError:
            raise UnicomError(
                f"{ENV_VAR}: expected host:namespace:pid:start, got {text!r}"
            ) from None


def pid_namespace() -> str:
    """The PID namespace's inode ('' without /proc): equal pids mean the same process only
    within one namespace."""
    try:
        return str(os.stat(PROC / "self/ns/pid").st_ino)
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks after boot, field 22 of /proc/PID/stat);
    None when there is no such process or it is a zombie; '' where /proc is missing."""
    if not PROC.is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    state, start = fields[0], fields[19]
    return None if state in ("Z", "X") else start


def this_process() -> Scheduler:
    pid = os.getpid()
    return Scheduler(socket.gethostname(), pid_namespace(), pid, process_start(pid) or "")


def shell_export() -> str:
    """``export UNICOM_SCHEDULER=...;`` naming this process, for the Snakefile's shell prefix."""
    return f"export {ENV_VAR}={shlex.quote(str(this_process()))}; "


def visible(scheduler: Scheduler) -> bool:
    """Whether this process can see ``scheduler``'s pid: same host, same PID namespace."""
    return scheduler.host == socket.gethostname() and scheduler.namespace == pid_namespace()


def is_running(scheduler: Scheduler) -> bool:
    start = process_start(scheduler.pid)
    return start is not None and (not scheduler.start or not start or start == scheduler.start)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children first), from /proc; [] without /proc."""
    children: dict[int, list[int]] = {}
    for entry in PROC.glob("[0-9]*") if PROC.is_dir() else []:
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def send(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            pass  # already gone


def stop_this_stage(grace_s: float = GRACE_S) -> None:
    """SIGTERM as a scheduler would send it, then SIGKILL after ``grace_s`` if still running."""
    me = os.getpid()
    if not callable(signal.getsignal(signal.SIGTERM)):
        # The default action ends this process at once, and workers it started (a
        # multiprocessing pool) would be orphaned: they go first.
        send(descendants(me), signal.SIGTERM)
    os.kill(me, signal.SIGTERM)
    time.sleep(grace_s)
    log.error("still running %.0f s after SIGTERM: killing it", grace_s)
    send([*descendants(me), me], signal.SIGKILL)


def _watch(scheduler: Scheduler, poll_s: float, grace_s: float) -> None:
    while is_running(scheduler):
        time.sleep(poll_s)
    log.warning(
        "the Snakemake process that started this job (pid %d) is gone: stopping as on SIGTERM",
        scheduler.pid,
    )
    stop_this_stage(grace_s)


def watch(
    env: Mapping[str, str] | None = None, poll_s: float = POLL_S, grace_s: float = GRACE_S
) -> threading.Thread | None:
    """Start the daemon thread that stops this stage once its scheduler is gone; None when
    there is nothing to watch (see the module's docstring)."""
    text = (os.environ if env is None else env).get(ENV_VAR)
    if not text:
        return None
    scheduler = Scheduler.parse(text)
    if not visible(scheduler):
        return None
    thread = threading.Thread(
        target=_watch, args=(scheduler, poll_s, grace_s), name="unicom-watchdog", daemon=True
    )
    thread.start()
    return thread
