"""DVC experiments as a team uses them, for real, on one fresh `git init` + `dvc init` copy of the project (tiny
quick-start settings; the copy is shared by the tests of this module, in order):

- a workspace `dvc exp run`, rerun with a setting that cannot change training (loader workers, overlay count):
  train does not run again;
- then two experiments through the queue (`dvc exp run --queue`, `dvc queue start`): all record one data version,
  the better queued one becomes champion over the workspace champion, and every version names its experiment, is
  not dirty, and leaves the committed data.dvc untouched;
- `fcnseg reproduce` of an experiment's version prints `dvc exp apply <name>` + `dvc repro`, and --run rebuilds it
  to the same metrics; no MLflow progress bar in its output;
- an interrupted `dvc exp run` (SIGKILL, then, rerun, Ctrl-C), rerun, resumes from its last checkpoint into the same
  MLflow run each time; trained after an uncommitted source change, its version is marked dirty.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from tests.test_pipeline_e2e import TINY, fresh_project, project_env, run  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
DVC = str(Path(sys.executable).with_name("dvc"))
# Tiny runs learn only the class prior in their few steps (every pixel background: val mIoU 0.062 here), so the
# "worse" model is made worse on purpose: gradient ascent on the loss (AdamW maximize=True) predicts no pixel right.
WEAK = ["model=fcn32s", "+optim.optimizer.maximize=true", "optim.lr=0.01", "trainer.max_epochs=1"]
STRONG = ["model=fcn8s", "trainer.max_epochs=1"]


def sets(*overrides: str) -> list[str]:
    return [arg for override in ["experiment=quickstart", *TINY, *overrides] for arg in ("-S", override)]


def client_of(project: Path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{project / 'mlflow.db'}"
    return mlflow.MlflowClient(uri, registry_uri=uri)


def versions(project: Path) -> list:
    client = client_of(project)  # each read whole: search results leave the aliases out
    found = client.search_model_versions("name='fcn-voc'")
    return [client.get_model_version("fcn-voc", n) for n in sorted((v.version for v in found), key=int)]


def wait_for_queue(project: Path, timeout: float = 1500) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run(project, DVC, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(5)
    raise AssertionError(f"the queue did not finish: {status}")


def test_settings_that_cannot_change_training_do_not_rerun_it(fresh_project):
    project = fresh_project  # the first test of this module: its run is the workspace champion the queue beats
    pin = (project / "data.dvc").read_text()
    first = run(project, DVC, "exp", "run", *sets(*WEAK))
    assert "Running stage 'train'" in first.stdout
    assert (project / "data.dvc").read_text() == pin  # dvc exp run leaves the committed pin as it is
    assert run(project, "git", "status", "--porcelain", "data.dvc").stdout == ""
    registered = versions(project)
    assert len(registered) == 1 and "champion" in registered[0].aliases
    again = run(project, DVC, "exp", "run", *sets(*WEAK, "data.datamodule.num_workers=1",
                                                  "tracking.num_overlays=1"))
    assert "Running stage 'train'" not in again.stdout and "Running stage 'evaluate'" in again.stdout, again.stdout
    assert len(versions(project)) == len(registered)  # the same run's checkpoint: no second version


def test_queued_experiments_share_the_data_version_and_the_better_one_becomes_champion(fresh_project):
    project = fresh_project
    pin = (project / "data.dvc").read_text()
    [first] = versions(project)  # the workspace champion, v1: the workspace `dvc exp run` of the test before
    assert "champion" in first.aliases

    run(project, DVC, "exp", "run", "--queue", "--name", "weak-queued", *sets(*WEAK, "seed=7"))
    run(project, DVC, "exp", "run", "--queue", "--name", "strong-queued", *sets(*STRONG))
    run(project, DVC, "queue", "start", "-j", "1")
    status = wait_for_queue(project)
    assert "Failed" not in status, status + run(project, DVC, "queue", "logs", "strong-queued").stdout[-3000:]

    registered = versions(project)
    assert len(registered) == 3
    data = {v.version: v.tags["data_version"] for v in registered}
    assert len(set(data.values())) == 1, data  # one dataset, one data version, whatever the execution path
    by_name = {v.tags.get("dvc_exp_name") or client_of(project).get_run(v.run_id).data.tags.get("dvc_exp_name"): v
               for v in registered}
    assert {"weak-queued", "strong-queued"} <= set(by_name)
    champion = client_of(project).get_model_version_by_alias("fcn-voc", "champion")
    assert champion.version == by_name["strong-queued"].version
    assert float(champion.tags["val_mean_iou"]) > float(first.tags["val_mean_iou"])

    baseline = run(project, "git", "rev-parse", "HEAD").stdout.strip()
    for version in registered:  # lineage: the experiment, its baseline, not dirty
        tags = client_of(project).get_run(version.run_id).data.tags
        assert tags["git_dirty"] == "false", (version.version, tags)
        assert tags["dvc_exp_baseline"] == baseline and tags["git_commit"] == baseline
    assert (project / "data.dvc").read_text() == pin


def test_reproduce_an_experiments_version_applies_it_and_rebuilds_the_same_metrics(fresh_project):
    project = fresh_project
    shown = run(project, sys.executable, "-m", "fcnseg.cli", "reproduce", "models:/fcn-voc@champion",
                "--tracking-uri", f"sqlite:///{project / 'mlflow.db'}")
    output = shown.stdout + shown.stderr
    assert "Downloading artifacts" not in output and "%|" not in output  # no MLflow progress bar
    champion = client_of(project).get_model_version_by_alias("fcn-voc", "champion")
    commit = run(project, "git", "rev-parse", f"refs/exps/{champion.tags['git_commit'][:2]}/"
                 f"{champion.tags['git_commit'][2:]}/strong-queued").stdout.strip()
    # resolved after the fact, from the experiment's ref, and recorded on the version
    assert client_of(project).get_model_version("fcn-voc", champion.version).tags.get("dvc_exp_commit") == commit
    # the quick start has no VOC tarball here, which `dvc exp apply` would fail to check out: the experiment's commit
    assert "DVC experiment strong-queued" in output and f"git checkout {commit} -- ." in output, output
    assert "dvc repro --force" in output

    run(project, "git", "checkout", "--", ".")  # the workspace as committed (the earlier workspace exp applied)
    rebuilt = run(project, sys.executable, "-m", "fcnseg.cli", "reproduce", "models:/fcn-voc@champion", "--run",
                  "--tracking-uri", f"sqlite:///{project / 'mlflow.db'}", timeout=1200)
    assert "Running stage 'train'" in rebuilt.stdout + rebuilt.stderr  # trained again, not taken from the cache
    metrics = json.loads((project / "metrics.json").read_text())
    assert metrics["mean_iou"] == pytest.approx(float(champion.tags["val_mean_iou"]), abs=1e-6)


def interrupt(project: Path, command: list[str], sig: int, after_epoch: int) -> tuple[Path, int, str]:
    """Starts ``command`` and sends ``sig`` to its whole process group once the train stage has kept epoch
    ``after_epoch``'s checkpoint in its stash (it is then training the next epoch); returns the stash, the epoch its
    last checkpoint holds after the interruption, and the command's output."""
    process = subprocess.Popen(command, cwd=project, env=project_env(project), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    stashes = project / ".dvc" / "tmp" / "fcnseg-runs"
    deadline = time.monotonic() + 600
    kept = []
    while time.monotonic() < deadline and process.poll() is None and not kept:
        kept = [p for p in stashes.glob("*/checkpoints/last.ckpt") if kept_epoch(p) >= after_epoch]
        time.sleep(0.2)
    # the train stage itself still running (dvc goes on to other stages after it): its stash is not yet dropped
    training = subprocess.run(["pgrep", "-s", str(process.pid), "-f", "fcnseg.pipeline train"], capture_output=True)
    assert kept and training.returncode == 0, "training ended before it could be interrupted; make it longer"
    os.killpg(process.pid, sig)  # Ctrl-C reaches the whole foreground group; SIGKILL leaves no chance to clean up
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0, f"the interrupted experiment went on (exit 0):\n{output[-3000:]}"
    assert kept[0].is_file(), f"the interrupted run's stash is gone: {sorted(stashes.rglob('*'))}\n{output[-3000:]}"
    assert "Running stage 'evaluate'" not in output, output[-3000:]  # dvc stopped with the train stage
    return kept[0].parents[1], kept_epoch(kept[0]), output


def kept_epoch(checkpoint: Path) -> int:
    try:
        return torch.load(checkpoint, weights_only=True)["epoch"]
    except Exception:  # read while being replaced: not kept yet
        return -1


LONG = ["model=fcn8s", "trainer.max_epochs=4", "data.synthetic.num_train=48"]


def test_an_experiment_killed_then_interrupted_with_ctrl_c_resumes_each_time_into_the_same_mlflow_run(
        fresh_project):
    # One experiment, stopped twice as users stop them: SIGKILL (no chance to clean up) in epoch 1, then, resumed,
    # Ctrl-C (SIGINT to the foreground group: dvc and the stage) in epoch 2; the third run finishes it. It trains
    # after a real uncommitted source change (not one DVC's experiment applied): its version stays dirty.
    project, command = fresh_project, [DVC, "exp", "run", *sets(*LONG)]
    edited = project / "src" / "fcnseg" / "viz.py"
    edited.write_text(edited.read_text() + "# an uncommitted change\n")
    stash, killed_at, _ = interrupt(project, command, signal.SIGKILL, after_epoch=0)
    run_id = json.loads((stash / "mlflow_run.json").read_text())["run_id"]

    same_stash, stopped_at, output = interrupt(project, command, signal.SIGINT, after_epoch=killed_at + 1)
    assert "resuming the interrupted run" in output and "Restoring states from the checkpoint" in output, output
    assert "Detected KeyboardInterrupt" in output and same_stash == stash
    assert json.loads((stash / "mlflow_run.json").read_text())["run_id"] == run_id
    assert killed_at < stopped_at < 3  # each time really stopped before the end, and later than the time before

    rerun = run(project, *command)
    output = rerun.stdout + rerun.stderr
    assert "resuming the interrupted run" in output and "Restoring states from the checkpoint" in output, output
    record = json.loads((project / "artifacts" / "train" / "mlflow_run.json").read_text())
    assert record["run_id"] == run_id  # the same MLflow run, continued twice
    client = client_of(project)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {int(m.value) for m in client.get_metric_history(run_id, "epoch")} == {0, 1, 2, 3}  # every epoch, once
    assert not stash.exists()  # dropped once the run finished

    registered = json.loads((project / "artifacts" / "register.json").read_text())
    version = client.get_model_version("fcn-voc", registered["version"])
    assert version.run_id == run_id
    assert version.tags["git_dirty"] == "true" and client.get_run(run_id).data.tags["git_dirty"] == "true"
    assert "(working tree was dirty: not exactly reproducible)" in version.description
    run(project, "git", "checkout", "--", str(edited))
