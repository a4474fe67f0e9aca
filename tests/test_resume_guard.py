"""No silent resume: a run into an output dir whose checkpoint came from another config refuses (or starts over when
told), and MLflow's refusals are reported as what they are, not as an unreachable server."""

from __future__ import annotations

import json
import subprocess

import mlflow
import pytest
from omegaconf import OmegaConf

from fcnseg.errors import ConfigError, TrackingError
from fcnseg.run_dir import check_resume_config, config_differences
from tests.tiny import ROOT, subprocess_env, tiny_overrides, train_command, train_in_process


def test_config_differences_leave_out_keys_that_cannot_change_results():
    old = {"optim": {"lr": 1e-3}, "trainer": {"devices": 1, "max_epochs": 5},
           "data": {"datamodule": {"num_workers": 4, "batch_size": 8}}, "tracking": {"run_name": "a"}}
    new = {"optim": {"lr": 2e-4}, "trainer": {"devices": 4, "max_epochs": 5},
           "data": {"datamodule": {"num_workers": 0, "batch_size": 16}}, "tracking": {"run_name": "b"}}
    assert config_differences(old, new) == ["data.datamodule.batch_size", "optim.lr"]


def test_resume_force_returns_the_changed_keys_instead_of_refusing(tmp_path):
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml({"optim": {"lr": 1e-3}, "resume": "strict"}))
    with pytest.raises(ConfigError) as info:
        check_resume_config(OmegaConf.create({"optim": {"lr": 2e-4}, "resume": "strict"}), tmp_path, "x/last.ckpt")
    message = str(info.value)
    assert "\n" not in message and "optim.lr" in message
    assert "paths.output_dir" in message and "ckpt_path=null" in message and "resume=force" in message
    forced = OmegaConf.create({"optim": {"lr": 2e-4}, "resume": "force"})
    assert check_resume_config(forced, tmp_path, "x/last.ckpt") == ["optim.lr"]


@pytest.mark.slow
def test_rerun_with_another_lr_refuses_and_ckpt_path_null_starts_a_new_mlflow_run(tmp_path):
    def train(*extra):
        return subprocess.run(train_command(tiny_overrides(tmp_path, epochs=1) + list(extra)), cwd=ROOT,
                              env=subprocess_env(), capture_output=True, text=True, timeout=600)

    train_in_process(tiny_overrides(tmp_path, epochs=1) + ["optim.lr=0.001"])  # the first run: an input, in-process
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns

    refused = train("optim.lr=0.0002")  # the trap: this used to resume lr 0.001 silently and train nothing
    assert refused.returncode == 2
    [line] = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "optim.lr" in line and "optim.optimizer.lr" in line and "ckpt_path=null" in line
    assert "unreachable" not in refused.stderr and last.stat().st_mtime_ns == before

    fresh = train("optim.lr=0.0002", "ckpt_path=null")  # the way out: start over in the same dir
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(run.data.params["optim.lr"] for run in runs) == ["0.0002", "0.001"]  # a new run, not a conflict
    recorded = json.loads((tmp_path / "out" / "mlflow_run.json").read_text())
    assert client.get_run(recorded["run_id"]).data.params["optim.lr"] == "0.0002"


def test_a_param_conflict_is_reported_as_such_not_as_an_unreachable_server(tmp_path):
    from fcnseg.runs import is_unreachable_error
    from fcnseg.tracking import ResilientMLFlowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("conflict")).info.run_id
    client.log_param(run_id, "optim.lr", "0.001")
    logger = ResilientMLFlowLogger(output_dir=tmp_path, tracking_uri=uri, run_id=run_id)
    with pytest.raises(TrackingError) as info:
        logger.log_hyperparams({"optim.lr": "0.0002"})
    assert "Changing param values is not allowed" in str(info.value) and logger.offline_since is None
    assert not is_unreachable_error(info.value.__cause__)
    assert is_unreachable_error(ConnectionRefusedError(111, "Connection refused"))
