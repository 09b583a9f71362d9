"""unicom.watchdog: a stage ends when the process that started it is gone (real processes,
real signals; tests/test_hard_kill.py does the same to a real Snakemake run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from unicom.errors import UnicomError
from unicom.watchdog import (
    ENV_VAR,
    Scheduler,
    is_running,
    shell_export,
    this_process,
    watch,
)

from helpers import REPO
from helpers.processes import gone, scheduler_env

# A stage as the workflow runs one: `python -m`-like, through run_cli. Its main starts a
# worker process the way img2dataset does (a spawned multiprocessing process) and waits; with
# --handle-sigterm it stops at its next "step" on SIGTERM and exits 143, as training does.
STAGE = textwrap.dedent(
    """
    import multiprocessing, signal, sys, time
    from pathlib import Path
    from unicom.cli import run_cli

    def worker():
        time.sleep(600)

    def main(argv):
        out = Path(argv[0])
        stop = []
        if "--handle-sigterm" in argv:
            signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
        process = multiprocessing.get_context("spawn").Process(target=worker, daemon=True)
        process.start()
        (out / "worker.pid").write_text(str(process.pid))
        (out / "started").touch()
        while not stop:
            time.sleep(0.1)
        (out / "checkpoint").touch()
        raise SystemExit(128 + stop[0])

    if __name__ == "__main__":
        run_cli(main, sys.argv[1:])
    """
)


def start_stage(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    environ = {**os.environ, "PYTHONPATH": str(REPO / "workflow"), **env}
    stage = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), *args],
        env=environ,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert stage.poll() is None, stage.communicate()[1]
        assert time.monotonic() < deadline, "the stage did not start"
        time.sleep(0.1)
    return stage


@pytest.mark.parametrize("handles_sigterm", [False, True], ids=["default", "handles-sigterm"])
def test_a_stage_ends_with_its_scheduler_and_takes_its_worker_along(tmp_path, handles_sigterm):
    scheduler = subprocess.Popen(["sleep", "600"])
    args = ["--handle-sigterm"] if handles_sigterm else []
    stage = worker = None
    try:
        stage = start_stage(tmp_path, scheduler_env(scheduler), *args)
        worker = int((tmp_path / "worker.pid").read_text())
        time.sleep(1.5)  # the stage keeps running while its scheduler does
        assert stage.poll() is None and not gone(worker)

        scheduler.kill()  # not reaped yet on purpose: a zombie is no scheduler either
        killed = time.monotonic()
        stage.wait(timeout=20)
        while not gone(worker) and time.monotonic() < killed + 10:
            time.sleep(0.1)
        assert gone(worker)
        assert time.monotonic() - killed < 10
    finally:
        for process in (scheduler, stage):
            if process is not None:
                process.kill()
                process.wait()
        if worker is not None and not gone(worker):
            os.kill(worker, signal.SIGKILL)
    stderr = stage.stderr.read()
    assert f"(pid {scheduler.pid}) is gone: stopping as on SIGTERM" in stderr
    if handles_sigterm:  # like training: its handler ran, it saved and exited by itself
        assert stage.returncode == 128 + signal.SIGTERM
        assert (tmp_path / "checkpoint").exists()
    else:
        assert stage.returncode == -signal.SIGTERM
        assert not (tmp_path / "checkpoint").exists()


def test_a_stage_run_by_hand_is_not_watched(tmp_path):
    assert watch({}) is None
    other_host = Scheduler("another-host", this_process().namespace, os.getpid(), "1")
    assert watch({ENV_VAR: str(other_host)}) is None  # srun's ranks on other nodes
    other_namespace = Scheduler(this_process().host, "1", os.getpid(), "1")
    assert watch({ENV_VAR: str(other_namespace)}) is None  # a container
    with pytest.raises(UnicomError, match=f"^{ENV_VAR}: expected host:namespace:pid:start"):
        watch({ENV_VAR: "12345"})


def test_a_reused_pid_is_not_the_scheduler():
    me = this_process()
    assert is_running(me)
    assert not is_running(Scheduler(me.host, me.namespace, me.pid, str(int(me.start) + 1)))
    ended = subprocess.Popen(["true"])
    ended.wait()
    assert not is_running(Scheduler(me.host, me.namespace, ended.pid, ""))


def test_the_shell_export_names_this_process():
    export = shell_export()
    assert export.startswith(f"export {ENV_VAR}=") and export.endswith("; ")
    value = export.removeprefix(f"export {ENV_VAR}=").removesuffix("; ")
    assert Scheduler.parse(value) == this_process()
    assert "{" not in export and "'" not in export  # nothing for a shell or format() to expand
