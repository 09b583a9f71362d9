"""Loopback servers a test starts, and processes it watches end."""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil

from unicom.watchdog import ENV_VAR, Scheduler, process_start, this_process


@contextlib.contextmanager
def loopback_http(handler: type[BaseHTTPRequestHandler], stop: threading.Event) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 (a free port) for ``handler``; yields its base URL.
    ``stop`` is set before the shutdown, so that handlers that stall on purpose return."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    assert not thread.is_alive()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def scheduler_env(process: subprocess.Popen) -> dict[str, str]:
    """UNICOM_SCHEDULER naming ``process``, as the Snakefile's prefix would in it."""
    me = this_process()
    return {ENV_VAR: str(Scheduler(me.host, me.namespace, process.pid, process_start(process.pid)))}
