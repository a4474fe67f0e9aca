"""Local servers for tests: a free port on 127.0.0.1, a real `mlflow server` subprocess, and stopping it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.mlflow_store import seed_store
from tests.tiny import subprocess_env


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (nothing listens there: connecting is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    """A tracking server's environment: MLflow 3's GenAI job runner off (fcnseg runs no server-side jobs; it would
    start five huey consumer processes that import MLflow and poll for the whole test)."""
    return {**subprocess_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_mlflow_server(db: Path, port: int, *extra_args: str, template: Path | None = None) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over a SQLite store, in its own process group; returns once /health
    answers (within 120 s). A new store starts as a copy of ``template`` (the ``mlflow_store_template``
    fixture), already migrated."""
    if template is not None:
        seed_store(db, template)
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{db}",
         "--default-artifact-root", str(db.parent / "server-artifacts"), "--host", "127.0.0.1", "--port",
         str(port), "--workers", "1", *extra_args],
        env=server_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return server
        except OSError:
            time.sleep(0.5)
    stop(server)
    raise RuntimeError("mlflow server did not start")


def stop(server: subprocess.Popen) -> None:
    """Kills the server's whole process group (uvicorn and its workers) and reaps it."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()
