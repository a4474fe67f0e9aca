"""A team server that lets no one in where they don't belong: a real ``mlflow server --app-name basic-auth`` on
127.0.0.1. With credentials (MLflow's environment variables) training, registration and promotion work; without,
each command fails in one line naming what to set; a user with read-only permission cannot move ``champion``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from fcnseg import registry
from fcnseg.errors import TrackingError
from tests.test_registry import Echo
from tests.servers import free_port, stop
from tests.tiny import ROOT, subprocess_env, tiny_overrides, train_command

pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF)")

ADMIN = ("admin", "admin-password-1234")
ALICE = ("alice", "alice-password-1234")  # creates and owns the model (MANAGE)
BOB = ("bob", "bob-password-123456")  # default permission: READ
EVALUATION = {"data_version": "d", "eval_split": "val", "eval_ids_sha256": "0" * 64}


def as_user(user: tuple[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env().items()
           if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    if user:
        env.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
    return env


def documented_auth_ini() -> str:
    """The server's auth.ini exactly as docs/team.md has users write it (login cache included)."""
    text = (ROOT / "docs" / "team.md").read_text()
    ini = text.split("cat > auth.ini <<'INI'\n", 1)[1].split("\nINI\n", 1)[0] + "\n"
    assert f"admin_username = {ADMIN[0]}" in ini and "auth_cache_ttl_seconds" in ini, ini
    return ini


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    port = free_port()
    ini = documented_auth_ini().replace("sqlite:///mlflow-auth.db", f"sqlite:///{tmp / 'auth.db'}")
    (tmp / "auth.ini").write_text(ini)
    env = {**as_user(None), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # as tests/servers.py
           "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--default-artifact-root", str(tmp / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
         "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        stop(process)
        raise RuntimeError(f"basic-auth server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
    previous = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        from mlflow.server.auth.client import AuthServiceClient

        os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN[0], MLFLOW_TRACKING_PASSWORD=ADMIN[1])
        admin = AuthServiceClient(uri)
        admin.create_user(*ALICE)
        admin.create_user(*BOB)
        yield {"uri": uri, "tmp": tmp}
    finally:
        for key, value in previous.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        stop(process)


def fcnseg(server, user, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcnseg.cli", *args, "--tracking-uri", server["uri"]],
                          capture_output=True, text=True, env=as_user(user), timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_with_credentials_training_registration_promotion_work(server, tmp_path) -> None:
    overrides = [o for o in tiny_overrides(tmp_path, epochs=1) if not o.startswith("tracking.tracking_uri=")]
    trained = subprocess.run(train_command([*overrides, f"tracking.tracking_uri={server['uri']}"]), cwd=ROOT,
                             env=as_user(ALICE), capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    model_uri = json.loads((tmp_path / "out" / "train_result.json").read_text())["model_uri"]
    os.environ.update(MLFLOW_TRACKING_USERNAME=ALICE[0], MLFLOW_TRACKING_PASSWORD=ALICE[1])
    try:
        client = registry.client_for(server["uri"])
        version = registry.register_model(model_uri, "fcn-auth", val_mean_iou=0.3, data_version="d",
                                          client=client, evaluation=EVALUATION)
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    promoted = fcnseg(server, ALICE, "promote", "fcn-auth", version.version)
    assert promoted.returncode == 0 and promoted.stdout.startswith(f"promoted fcn-auth v{version.version}"), \
        promoted.stderr
    listed = fcnseg(server, ALICE, "models", "fcn-auth")
    assert listed.returncode == 0 and "champion" in listed.stdout


def register_as_alice(server, name: str, iou: float) -> int:
    os.environ.update(MLFLOW_TRACKING_USERNAME=ALICE[0], MLFLOW_TRACKING_PASSWORD=ALICE[1])
    try:
        mlflow.set_tracking_uri(server["uri"])
        mlflow.set_registry_uri(server["uri"])
        mlflow.set_experiment(f"auth-{name}")
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
        version = registry.register_model(info.model_uri, name, val_mean_iou=iou, data_version="d",
                                          client=registry.client_for(server["uri"]), evaluation=EVALUATION,
                                          per_class_iou={"background": iou})
        return int(version.version)
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")


def test_without_credentials_each_command_fails_in_one_line_naming_what_to_set(server, tmp_path) -> None:
    v1 = register_as_alice(server, "fcn-auth-anon", 0.5)
    for args in (("models", "fcn-auth-anon"), ("promote", "fcn-auth-anon", str(v1)),
                 ("reproduce", "models:/fcn-auth-anon@challenger")):
        done = fcnseg(server, None, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "MLFLOW_TRACKING_USERNAME" in done.stderr and "MLFLOW_TRACKING_PASSWORD" in done.stderr, done.stderr
    overrides = [o for o in tiny_overrides(tmp_path, epochs=1) if not o.startswith("tracking.tracking_uri=")]
    trained = subprocess.run(train_command([*overrides, f"tracking.tracking_uri={server['uri']}"]), cwd=ROOT,
                             env=as_user(None), capture_output=True, text=True, timeout=600)
    assert trained.returncode != 0 and not (tmp_path / "out" / "checkpoints").exists()  # before the first step
    last = trained.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "MLFLOW_TRACKING_USERNAME" in last and "MLFLOW_TRACKING_PASSWORD" in last
    assert "Traceback" not in trained.stderr, trained.stderr[-2000:]
    wrong = fcnseg(server, (BOB[0], "not-his-password"), "models", "fcn-auth-anon")
    assert wrong.returncode == 2 and "refused user 'bob'; check MLFLOW_TRACKING_PASSWORD" in wrong.stderr
    with pytest.raises(TrackingError, match="set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        registry.promote("fcn-auth-anon", v1, client=registry.client_for(server["uri"]))


def test_a_read_only_user_cannot_move_champion(server) -> None:
    name = "fcn-auth-ro"
    v1 = register_as_alice(server, name, 0.5)
    assert fcnseg(server, ALICE, "promote", name, str(v1)).returncode == 0
    v2 = register_as_alice(server, name, 0.9)
    seen = fcnseg(server, BOB, "models", name)  # READ is enough to look
    assert seen.returncode == 0 and "champion" in seen.stdout
    refused = fcnseg(server, BOB, "promote", name, str(v2))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith(f"error: cannot promote {name} v{v2}: user 'bob' lacks the permission")
    forced = fcnseg(server, BOB, "promote", name, str(v2), "--force")
    assert forced.returncode == 2 and "user 'bob' lacks the permission" in forced.stderr
    listing = fcnseg(server, ALICE, "models", name)
    row = next(line for line in listing.stdout.splitlines() if line.split()[0] == str(v1))
    assert "champion" in row  # unchanged
    assert not fcnseg(server, ALICE, "models", f"{name}.promotion-lock").returncode == 0  # no lock left behind
