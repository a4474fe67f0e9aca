"""The whole DVC pipeline, for real, on a fresh `git init` + `dvc init` copy of the project (quick-start settings,
shrunk): prepare → train → evaluate → register, then the registered champion loads and segments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.mlflow_store import seed_store
from tests.tiny import ROOT, TINY_SIZES, subprocess_env

TINY = [*TINY_SIZES, "trainer.max_epochs=2", "trainer.max_time=null", "tracking.num_overlays=2"]


def project_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if not f.startswith((".dvc/", "tests/")) and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def fresh_project(tmp_path_factory, mlflow_store_template) -> Path:
    project = tmp_path_factory.mktemp("project")
    for name in project_files():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    seed_store(project / "mlflow.db", mlflow_store_template)  # the default store, migrated (git ignores it)
    dvc = str(Path(sys.executable).with_name("dvc"))
    env = subprocess_env()
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "config", "hydra.enabled", "true"],
                [dvc, "config", "core.analytics", "false"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@fcnseg.invalid", "-c", "user.name=test", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
    return project


def project_env(project: Path) -> dict[str, str]:
    """The environment of a command run in a project copy."""
    env = subprocess_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in dvc.yaml = this venv's
    env["PYTHONPATH"] = str(project / "src")  # the copy's code, not the checkout's
    env.update({"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@fcnseg.invalid",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@fcnseg.invalid"})
    return env


def run(project: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), cwd=project, env=project_env(project), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_quickstart_pipeline_runs_every_stage_and_registers_a_champion(fresh_project):
    dvc = str(Path(sys.executable).with_name("dvc"))
    sets = [arg for override in ["experiment=quickstart", *TINY] for arg in ("-S", override)]
    run(fresh_project, dvc, "exp", "run", *sets)  # the README's quick start: every stage

    # evaluate: the paper's four metrics + per-class IoU for `dvc metrics show`, plot data for `dvc plots show`
    metrics = json.loads((fresh_project / "metrics.json").read_text())
    assert {"pixel_acc", "mean_acc", "mean_iou", "fw_iou", "per_class_iou"} <= set(metrics)
    assert 0.0 <= metrics["mean_iou"] <= 1.0 and len(metrics["per_class_iou"]) == 21
    history = json.loads((fresh_project / "plots" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1] and "val/mean_iou" in history[0]
    for name in ("confusion_matrix.png", "per_class_iou.png", "predictions.png", "per_class_iou.json"):
        assert (fresh_project / "plots" / name).is_file()
    shown = run(fresh_project, dvc, "metrics", "show", "--json")
    assert "mean_iou" in shown.stdout

    # every stage's deps/params/outs are declared: nothing left to re-run
    status = run(fresh_project, dvc, "status", "--with-deps", "register")  # every stage (data.dvc is not one)
    assert "changed" not in status.stdout, status.stdout
    experiments = run(fresh_project, dvc, "exp", "show", "--json")
    assert "mean_iou" in experiments.stdout

    # register: version 1, aliases challenger and champion (first version), tagged with its score and data
    import mlflow

    uri = f"sqlite:///{fresh_project / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("fcn-voc", "champion")
    assert int(version.version) == 1 and set(version.aliases) == {"champion", "challenger"}
    assert float(version.tags["val_mean_iou"]) == pytest.approx(metrics["mean_iou"])
    registered = json.loads((fresh_project / "artifacts" / "register.json").read_text())
    assert registered["promoted"] and registered["version"] == 1

    # the train run holds the evaluation too (one run per pipeline run, in the quick start's experiment)
    run_info = json.loads((fresh_project / "artifacts" / "train" / "mlflow_run.json").read_text())
    train_run = client.get_run(run_info["run_id"])
    assert client.get_experiment(train_run.info.experiment_id).name == "fcnseg-quickstart"
    assert "val_best/mean_iou" in train_run.data.metrics  # the same name as `python -m fcnseg.train` logs
    # evaluated once per dvc repro: by the evaluate stage, not also at the end of the train stage
    assert len(client.get_metric_history(train_run.info.run_id, "val_best/mean_iou")) == 1

    # models:/fcn-voc@champion loads and predicts a mask of the input's size
    from fcnseg.serving import decode_label_map, encode_image

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/fcn-voc@champion")
    image = np.random.default_rng(1).integers(0, 255, (41, 59, 3), dtype=np.uint8)
    prediction = model.predict(pd.DataFrame({"image": [encode_image(image)]}))
    assert decode_label_map(prediction["mask"][0]).shape == (41, 59)


@pytest.mark.slow
def test_mlproject_entry_point_trains_into_the_run_mlflow_started(fresh_project, tmp_path):
    """`mlflow run . -e quickstart --env-manager local`, as the docs show (one epoch, tiny sizes through
    `-P overrides`): the training logs into the run MLflow opened for the project, which ends FINISHED with the
    metrics and the model."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlproject.db'}"
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    env_uri = {"MLFLOW_TRACKING_URI": uri}
    result = run(fresh_project, "env", *(f"{k}={v}" for k, v in env_uri.items()), mlflow_cli, "run", ".", "-e",
                 "quickstart", "-P", "max_epochs=1", "-P", f"overrides={' '.join(TINY_SIZES)}",
                 "--env-manager", "local", "--experiment-name", "mlproject")
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("mlproject")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, result.stderr[-2000:]  # one run: MLflow's, not a second one made by training
    project_run = runs[0]
    assert project_run.info.status == "FINISHED"
    assert {"val/mean_iou", "val/loss", "train/loss_epoch"} <= set(project_run.data.metrics)
    assert project_run.data.params.get("model.net.name") == "fcn8s"
    assert project_run.data.tags.get("mlflow.project.entryPoint") == "quickstart"
