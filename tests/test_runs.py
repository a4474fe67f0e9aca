"""Unit tests of the run-location and pipeline helpers (runs.py, pipeline.epoch_history): fast, in-process."""

from __future__ import annotations

import csv
import os

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, PERMISSION_DENIED, UNAUTHENTICATED
from omegaconf import OmegaConf

from fcnseg import runs
from fcnseg.errors import TrackingError
from fcnseg.pipeline import epoch_history


def test_project_root_is_the_real_project_from_dvc_temp_experiment_dirs(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    nested = tmp_path / "src" / "deep"
    nested.mkdir(parents=True)
    assert runs.project_root(nested) == tmp_path
    temp_exp = tmp_path / ".dvc" / "tmp" / "exps" / "run" / "abc123"
    temp_exp.mkdir(parents=True)
    (temp_exp / "dvc.yaml").write_text("stages: {}\n")  # a full copy of the project, as `dvc exp run --temp` makes
    assert runs.project_root(temp_exp) == tmp_path


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert runs.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    assert runs.resolve_tracking_uri() == "http://team:5000"
    assert runs.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"  # config / --tracking-uri win


def test_using_store_points_mlflow_at_a_store_for_the_block_only(tmp_path, monkeypatch):
    stale = f"sqlite:///{tmp_path / 'stale.db'}"  # what another call left as MLflow's registry default
    mlflow.set_registry_uri(stale)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    with runs.using_store(uri):
        assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
        assert os.environ["MLFLOW_TRACKING_URI"] == uri  # what a subprocess started in the block would use
    after = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    assert after == before and before[1] == stale and before[2] is None
    with pytest.raises(RuntimeError), runs.using_store(uri):
        raise RuntimeError("the block failed")
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before



def test_using_store_continues_a_run_whatever_experiment_the_caller_made_active(tmp_path):
    """A notebook (or an earlier call) made an experiment of another store active: publishing to a run of this
    store (``start_run(run_id=...)`` under ``using_store``) still works, and the caller's experiment comes back."""
    other, uri = f"sqlite:///{tmp_path / 'other.db'}", f"sqlite:///{tmp_path / 'a.db'}"
    client = mlflow.MlflowClient(uri, uri)
    for name in ("first", "second"):  # the run's experiment id differs from the active one's in any store
        runs.experiment_id(client, name)
    run = client.create_run(runs.experiment_id(client, "second"))
    mlflow.set_tracking_uri(other)  # what the notebook did (conftest puts MLflow's defaults back after the test)
    active = mlflow.set_experiment("notebook").experiment_id
    assert active != run.info.experiment_id
    with runs.using_store(uri), mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_param("published", "yes")
    assert client.get_run(run.info.run_id).data.params == {"published": "yes"}
    assert mlflow.tracking.fluent._active_experiment_id == active and os.environ["MLFLOW_EXPERIMENT_ID"] == active
    assert runs.experiment_id(client, "second") == run.info.experiment_id  # found, not made again


def test_unreachable_server_fails_fast_in_one_line():
    uri = "http://127.0.0.1:9"  # discard port: nothing answers
    with pytest.raises(TrackingError) as info:
        runs.check_reachable(uri, timeout=2)
    assert "\n" not in str(info.value) and uri in str(info.value) and "tracking.enabled=false" in str(info.value)
    runs.check_reachable("sqlite:///anything.db")  # file stores are not probed


def test_outage_and_refusal_are_told_apart():
    assert runs.is_unreachable_error(ConnectionRefusedError(111, "refused"))
    assert runs.is_unreachable_error(MlflowException("API request to http://x failed with exception ..."))
    assert not runs.is_unreachable_error(
        MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE))
    assert not runs.is_unreachable_error(ValueError("a bug"))


def test_auth_problems_name_what_to_set(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    login = runs.auth_problem(MlflowException("no", error_code=UNAUTHENTICATED), "promote m", "http://s")
    assert "MLFLOW_TRACKING_USERNAME" in login and "MLFLOW_TRACKING_PASSWORD" in login
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    denied = runs.auth_problem(MlflowException("no", error_code=PERMISSION_DENIED), "promote m", "http://s")
    assert "'ann'" in denied and "permission" in denied
    assert runs.auth_problem(MlflowException("other"), "promote m", "http://s") is None


def test_config_params_flatten_and_fit_mlflows_limits():
    cfg = OmegaConf.create({"a": {"b": 1, "c": None}, "lr": "${a.b}", "long": "x" * 600})
    params = runs.config_params(cfg)
    assert params == {"a.b": "1", "a.c": "", "lr": "1", "long": "x" * 500}


def test_epoch_history_keeps_epoch_values_per_epoch(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [{"epoch": "0", "step": "3", "train/loss_step": "2.0", "train/loss_epoch": "", "val/mean_iou": ""},
            {"epoch": "0", "step": "3", "train/loss_step": "", "train/loss_epoch": "1.5", "val/mean_iou": "0.25"},
            {"epoch": "1", "step": "7", "train/loss_step": "", "train/loss_epoch": "1.0", "val/mean_iou": "0.5"}]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert epoch_history(path) == [{"epoch": 0, "train/loss": 1.5, "val/mean_iou": 0.25},
                                   {"epoch": 1, "train/loss": 1.0, "val/mean_iou": 0.5}]
    assert epoch_history(tmp_path / "missing.csv") == []
