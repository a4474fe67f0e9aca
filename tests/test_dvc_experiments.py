"""DVC experiments as a team uses them, for real, on one fresh `git init` + `dvc init` copy of the project (tiny
quick-start settings; the copy is shared by the tests of this module, in order):

- a workspace `dvc exp run`, rerun with a setting that cannot change training (loader workers, overlay count):
  train does not run again;
- then two experiments through the queue (`dvc exp run --queue`, `dvc queue start`): all record one data version,
  the better queued one becomes champion over the workspace champion, and every version names its experiment, is
  not dirty, and leaves the committed data.dvc untouched;
- `fcnseg reproduce` of an experiment's version prints `dvc exp apply <name>` + `dvc repro`, and --run rebuilds it
  to the same metrics; no MLflow progress bar in its output;
- an interrupted `dvc exp run` (SIGKILL; SIGINT, marked xfail: a known open defect under load), rerun, resumes
  from its last checkpoint into the same MLflow run.
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

from tests.test_pipeline_e2e import TINY, fresh_project, run  # noqa: F401  (fixture)
from tests.tiny import subprocess_env

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


def interrupt_and_resume(project: Path, overrides: list[str], sig: int) -> None:
    command = [DVC, "exp", "run", *sets(*overrides)]
    env = subprocess_env()  # as `run` does: this venv's python, the copy's code
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONPATH=str(project / "src"))
    process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    stashes = project / ".dvc" / "tmp" / "fcnseg-runs"
    deadline = time.monotonic() + 600
    kept = []
    while time.monotonic() < deadline and process.poll() is None and not kept:
        kept = [p for p in stashes.glob("*/checkpoints/last.ckpt")]
        time.sleep(0.2)
    # the train stage itself still running (dvc goes on to other stages after it): its stash is not yet dropped
    training = subprocess.run(["pgrep", "-s", str(process.pid), "-f", "fcnseg.pipeline train"], capture_output=True)
    assert kept and training.returncode == 0, "training ended before it could be interrupted; make it longer"
    os.killpg(process.pid, sig)  # Ctrl-C reaches the whole foreground group; SIGKILL leaves no chance to clean up
    output = process.communicate(timeout=120)[0]
    assert kept[0].is_file(), f"the interrupted run's stash is gone: {sorted(stashes.rglob('*'))}\n{output[-3000:]}"
    stash = kept[0].parents[1]
    interrupted_at = torch.load(kept[0], weights_only=True)["epoch"]
    run_id = json.loads((stash / "mlflow_run.json").read_text())["run_id"]

    rerun = run(project, *command)
    output = rerun.stdout + rerun.stderr
    assert "resuming the interrupted run" in output and "Restoring states from the checkpoint" in output, output
    record = json.loads((project / "artifacts" / "train" / "mlflow_run.json").read_text())
    assert record["run_id"] == run_id  # the same MLflow run, continued
    client = client_of(project)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert interrupted_at < 3  # really stopped before the end
    assert {int(m.value) for m in client.get_metric_history(run_id, "epoch")} == {0, 1, 2, 3}  # every epoch, once
    assert not stash.exists()  # dropped once the run finished


LONG = ["model=fcn8s", "trainer.max_epochs=4", "data.synthetic.num_train=48"]


def test_a_killed_experiment_resumes_into_the_same_mlflow_run(fresh_project):
    interrupt_and_resume(fresh_project, [*LONG, "seed=11"], signal.SIGKILL)


# Known defect, not understood yet: on a fresh clone under the full suite's load (2 of 2 runs in stop 26), the
# SIGINT reached `dvc exp run` while its train stage was running (pgrep saw it) and the experiment still ran to
# its end, so there was nothing to resume; it passes on a quieter machine (4 of 4). Not strict, so that it reports
# XPASS/XFAIL instead of hiding: see the note.
@pytest.mark.xfail(strict=False, reason="Ctrl-C into dvc exp run under heavy load sometimes does not stop training")
def test_a_ctrl_c_interrupted_experiment_resumes_into_the_same_mlflow_run(fresh_project):
    interrupt_and_resume(fresh_project, LONG, signal.SIGINT)
