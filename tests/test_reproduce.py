"""``fcnseg reproduce``: the printed commands rebuild a registered version's exact training config at its commit,
and ``--run`` runs them (git checkout, real training). Real git clone, SQLite MLflow store and subprocesses."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from fcnseg import registry
from fcnseg.reproduce import LOCAL_KEYS, compose_at_commit
from fcnseg.runs import flatten
from tests.test_registry import Echo
from tests.tiny import ROOT, subprocess_env, tiny_overrides


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, str]:
    """A clone of this repository with the working tree committed on top (the code under test, whatever HEAD
    holds): `git checkout` in it touches nothing of the working checkout."""
    target = tmp_path_factory.mktemp("reproduce") / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True, timeout=120)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source, copy = ROOT / name, target / name
        if source.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "add", "-A"], cwd=target, check=True, timeout=120)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "working tree under test"], cwd=target, check=True,
                   timeout=120)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=target, capture_output=True, text=True,
                          check=True).stdout.strip()
    return target, head


def register_trained_config(tmp_path: Path, clone: tuple[Path, str], overrides: list[str]) -> tuple[str, dict]:
    """A run whose config.yaml is the config composed at the clone's HEAD with ``overrides``, registered."""
    root, head = clone
    logged = compose_at_commit(root, head, {"data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out")},
                               overrides)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("reproduce-tests")
        with mlflow.start_run() as run:
            mlflow.set_tags({"git_commit": head, "git_dirty": "false"})
            mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(logged)), "config.yaml")
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
        registry.register_model(info.model_uri, "fcn-rep", val_mean_iou=0.5, data_version="d",
                                client=registry.client_for(uri))
        assert run.info.run_id
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    return uri, logged


def reproduce_cli(root: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'elsewhere.db'}"}  # --tracking-uri wins
    return subprocess.run([sys.executable, "-m", "fcnseg.cli", "reproduce", "models:/fcn-rep@challenger", *args,
                           "--tracking-uri", uri], cwd=root, capture_output=True, text=True, env=env, timeout=900)


def comparable(config: dict, machine_path: Path | None = None) -> dict:
    """Leaves of a config but the machine-specific ones (and those resolved from ``machine_path``)."""
    return {k: v for k, v in flatten(config).items() if not k.startswith(LOCAL_KEYS)
            and not (machine_path and str(machine_path) in str(v))}


def test_printed_commands_rebuild_the_exact_config(tmp_path: Path, clone: tuple[Path, str]) -> None:
    root, head = clone
    overrides = ["experiment=quickstart", "model=fcn16s", "optim.lr=0.00042", "data.synthetic.num_train=16",
                 "trainer.max_epochs=1", "tracking.experiment_name='team a, b'"]
    uri, logged = register_trained_config(tmp_path, clone, overrides)
    result = reproduce_cli(root, uri)
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    assert commands[0] == f"git checkout {head}"
    assert not any(c.startswith(("dvc pull", "fcnseg fetch")) for c in commands)  # synthetic: regenerated
    train = shlex.split(commands[-1])
    assert train[:3] == ["python", "-m", "fcnseg.train"]
    assert f"paths.output_dir=reproduce/fcn-rep-v1" in train
    printed = [o for o in train[3:] if not o.startswith(("paths.", "tracking.run_name="))]
    rebuilt = compose_at_commit(root, head, {"data_dir": str(tmp_path / "data")}, printed)
    assert comparable(rebuilt) == comparable(logged)
    assert rebuilt["model"]["name"] == "fcn16s" and rebuilt["tracking"]["experiment_name"] == "team a, b"


def test_voc_versions_get_their_data_first(tmp_path: Path, clone: tuple[Path, str]) -> None:
    uri, _ = register_trained_config(tmp_path, clone, ["model=fcn16s"])  # data=voc, the default
    result = reproduce_cli(clone[0], uri)
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    assert commands[1].startswith("dvc pull data.dvc  # from the team's DVC remote")
    assert commands[2] == "fcnseg fetch --data-dir data"
    assert shlex.split(commands[3])[3:5] == ["model.name=fcn16s", "model.net.name=fcn16s"]


def test_unknown_model_uri_is_one_line(tmp_path: Path, clone: tuple[Path, str]) -> None:
    uri, _ = register_trained_config(tmp_path, clone, ["experiment=quickstart"])
    done = subprocess.run([sys.executable, "-m", "fcnseg.cli", "reproduce", "models:/fcn-rep@nope",
                           "--tracking-uri", uri], cwd=clone[0], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: cannot find models:/fcn-rep@nope")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_run_checks_out_and_retrains_the_same_config(tmp_path: Path, clone: tuple[Path, str]) -> None:
    root, head = clone
    tiny = [o for o in tiny_overrides(tmp_path, epochs=1) if not o.startswith(("paths.", "tracking.tracking_uri"))]
    uri, logged = register_trained_config(tmp_path, clone, tiny)
    result = reproduce_cli(root, uri, "--run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[1/2] git checkout" in result.stdout and "[2/2] python -m fcnseg.train" in result.stdout
    head_now = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert head_now == head
    out = root / "reproduce" / "fcn-rep-v1"
    rebuilt = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    # the only difference: data paths follow this checkout's paths.data_dir instead of the original run's
    machine_keys = set(comparable(logged)) - set(comparable(logged, tmp_path))
    assert machine_keys == {"data.root", "data.datamodule.root"}
    assert {k: v for k, v in comparable(rebuilt).items() if k not in machine_keys} == comparable(logged, tmp_path)
    assert rebuilt["data"]["root"] == "data/synthetic/VOC2012" and (root / "data/synthetic/VOC2012").is_dir()
    result_file = json.loads((out / "train_result.json").read_text())
    client = mlflow.MlflowClient(uri)  # the rebuild is tracked in the store the version came from
    assert client.get_run(result_file["run_id"]).info.run_name == "reproduce-fcn-rep-v1"
