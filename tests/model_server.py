"""A real ``mlflow models serve`` process on 127.0.0.1 for tests and the serving load benchmark, and a client that
returns (status, parsed body, raw size) without raising on 4xx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.servers import free_port, stop


def serve(model_uri: str, cwd: Path, env: dict[str, str], env_manager: str | None = "local",
          timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Starts ``mlflow models serve`` (1 worker) in its own process group; returns (process, base URL) once /ping
    answers. ``env_manager=None``: MLflow's default (it builds the model's own virtualenv). The server's stderr goes to ``cwd/serve.log`` (shown when it does not come up)."""
    port = free_port()
    # mlflow execs `uvicorn` by name: the environment's bin dir must be on PATH, as in an activated venv
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', os.environ.get('PATH', ''))}"}
    log = cwd / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
         *(["--env-manager", env_manager] if env_manager else []), "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return server, url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    stop(server)
    raise AssertionError(f"mlflow models serve did not answer /ping within {timeout:.0f} s "
                         f"(exit {server.returncode}); log:\n{log.read_text()[-4000:]}")


def post(url: str, body: bytes, content_type: str = "application/json",
         timeout: float = 120.0) -> tuple[int, dict | str, int]:
    """POST to ``url/invocations``: (status, JSON body or text, body size in bytes)."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw), len(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace"), len(raw)


def records(*encoded: str) -> bytes:
    return json.dumps({"dataframe_records": [{"image": image} for image in encoded]}).encode()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (uvicorn's worker is a child of mlflow's CLI)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
            with open(f"/proc/{current}/task/{current}/children") as children:
                todo += [int(child) for child in children.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def load_test(url: str, bodies: list[bytes], clients: int, requests_per_client: int,
              timeout: float = 120.0) -> dict:
    """``clients`` threads each POST ``requests_per_client`` bodies (cycling through ``bodies``, each client from
    its own offset); latency percentiles of all requests, counts by status, and transport errors."""
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    def client(offset: int) -> list[tuple[int, float]]:
        done = []
        for i in range(requests_per_client):
            started = time.perf_counter()
            try:
                status = post(url, bodies[(offset + i) % len(bodies)], timeout=timeout)[0]
            except OSError:
                status = -1  # no HTTP answer at all (refused, reset, timed out)
            done.append((status, time.perf_counter() - started))
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - started
    latencies = sorted(t for _, t in results)
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {"requests": len(results), "clients": clients, "wall_s": wall, "statuses": statuses,
            "transport_errors": statuses.get("-1", 0), "server_errors": sum(n for s, n in statuses.items()
                                                                             if s.startswith("5")),
            "p50_s": statistics.median(latencies), "p95_s": percentile(0.95), "max_s": latencies[-1]}
