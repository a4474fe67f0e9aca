"""Promotion against a real ``mlflow server`` on 127.0.0.1 (HTTP, no shared file to lock): the registry-held lock
makes promoters wait for each other, concurrent promotions leave one consistent champion, stale locks are broken."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest

from fcnseg import registry
from fcnseg.registry.locks import server_lock
from tests.test_registry import Echo, assert_serial_history, start_promoters
from tests.servers import free_port, start_mlflow_server, stop

EVALUATION = {"data_version": "d", "eval_split": "val", "eval_ids_sha256": "0" * 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_store_template):
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    process = start_mlflow_server(tmp / "server.db", port, template=mlflow_store_template)
    uri = f"http://127.0.0.1:{port}"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        mlflow.set_experiment("server-registry")
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
        yield {"uri": uri, "client": registry.client_for(uri), "model_uri": info.model_uri}
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        stop(process)


def add(server, name: str, iou: float) -> int:
    version = registry.register_model(server["model_uri"], name, val_mean_iou=iou, data_version="d",
                                      client=server["client"], evaluation=EVALUATION,
                                      per_class_iou={"background": iou}, model_card=False)
    return int(version.version)


def champion(server, name: str) -> int:
    return int(server["client"].get_registered_model(name).aliases["champion"])


def test_a_promotion_waits_for_the_lock_another_holds(server, tmp_path) -> None:
    name = "fcn-http-wait"
    v1, v2 = add(server, name, 0.5), add(server, name, 0.6)
    registry.promote(name, v1, client=server["client"])
    with server_lock(server["client"], name):  # another promoter, mid read-compare-set
        [process] = start_promoters(tmp_path, server["uri"], name, (v2,))  # imported, connected: promote is next
        time.sleep(5)  # an unlocked promotion takes well under a second from here
        assert process.poll() is None, process.communicate()
        assert champion(server, name) == v1
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert out.startswith(f"promoted {name} v{v2} to champion") and champion(server, name) == v2
    assert not server["client"].search_registered_models(filter_string=f"name = '{name}.promotion-lock'")


def test_concurrent_promotions_over_http_leave_one_consistent_champion(server, tmp_path) -> None:
    name = "fcn-http-race"
    v1, a, b = add(server, name, 0.5), add(server, name, 0.6), add(server, name, 0.7)
    registry.promote(name, v1, client=server["client"])
    for proc in start_promoters(tmp_path, server["uri"], name, (a, b)):
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    assert_serial_history(server["client"], name, v1, a, b)


HAMMER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from fcnseg.registry import client_for
    from fcnseg.registry.locks import server_lock
    uri, name, log, ready, go, rounds = sys.argv[1:]
    client = client_for(uri)
    client.search_registered_models(max_results=1)
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.005)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    for _ in range(int(rounds)):
        with server_lock(client, name):
            os.write(fd, f"in {os.getpid()}\\n".encode())
            os.write(fd, f"out {os.getpid()}\\n".encode())
""")


def test_the_server_lock_excludes_and_no_contender_fails_when_a_holder_releases_mid_request(server, tmp_path) -> None:
    """Back-to-back takes by three processes: MLflow's SQL store answers a create whose name was just deleted with
    RESOURCE_DOES_NOT_EXIST (it re-reads the existing model to word its error); a contender must retry, not fail.
    Without the retry this failed in 4 of 4 runs here; a promotion race in CI failed on it once."""
    log, go, contenders, rounds = tmp_path / "log", tmp_path / "go", 3, 50
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, server["uri"], "fcn-http-hammer", str(log),
                               str(tmp_path / f"ready{i}"), str(go), str(rounds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
             for i in range(contenders)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(contenders)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * contenders * rounds
    for enter, leave in zip(lines[::2], lines[1::2]):  # nobody entered while another held the lock
        assert enter.startswith("in ") and leave == "out " + enter[3:], (enter, leave)
    assert not server["client"].search_registered_models(filter_string="name = 'fcn-http-hammer.promotion-lock'")


def test_a_stale_lock_left_by_a_dead_promoter_is_broken(server) -> None:
    name = "fcn-http-stale"
    v1 = add(server, name, 0.5)
    server["client"].create_registered_model(f"{name}.promotion-lock",
                                             tags={"holder": "dead", "acquired": repr(time.time() - 3600)})
    assert registry.promote(name, v1, client=server["client"]).promoted
    assert not server["client"].search_registered_models(filter_string=f"name = '{name}.promotion-lock'")
