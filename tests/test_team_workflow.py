"""The team workflow of docs/team.md, for real: a bare git origin, a shared DVC remote (a local folder), a real
`mlflow server` on 127.0.0.1, and two clones at different paths (tiny quick-start settings added to each
`dvc exp run`):

- Alice runs an experiment, commits what it changed (params, lock, metrics, plots, register.json), pushes the
  outputs to the DVC remote, the commit to git and the experiment with `dvc exp push`;
- Bob clones elsewhere, `dvc pull`s her run (no path of hers in it), re-evaluates it (only the evaluate stage
  runs, into her MLflow run on the server), trains a variant through the DVC queue, and `fcnseg promote`s it;
- the champion is Bob's version, on the same data version as Alice's, naming its experiment and baseline commit,
  not dirty; `fcnseg reproduce` of it names the experiment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.servers import free_port, start_mlflow_server, stop
from tests.test_dvc_experiments import STRONG, WEAK, sets
from tests.test_pipeline_e2e import project_files
from tests.tiny import ROOT, subprocess_env

pytestmark = pytest.mark.slow
DVC = str(Path(sys.executable).with_name("dvc"))


def shell(cwd: Path, uri: str, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONPATH=str(cwd / "src"),
               MLFLOW_TRACKING_URI=uri, GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="t@fcnseg.invalid",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="t@fcnseg.invalid")
    result = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture
def server(tmp_path, mlflow_store_template):
    port = free_port()
    process = start_mlflow_server(tmp_path / "server.db", port, template=mlflow_store_template)
    yield f"http://127.0.0.1:{port}"
    stop(process)


def test_two_clones_share_runs_through_a_dvc_remote_and_a_tracking_server(tmp_path, server):
    origin, alice, bob, remote = (tmp_path / name for name in ("origin.git", "alice", "bob", "dvc-remote"))
    alice.mkdir()
    for name in project_files():
        (alice / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, alice / name)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    for cmd in (["git", "init", "-q", "-b", "main"], [DVC, "init", "-q"], [DVC, "config", "hydra.enabled", "true"],
                [DVC, "config", "core.analytics", "false"], ["git", "remote", "add", "origin", str(origin)],
                # docs/team.md, once per project: the shared DVC remote, committed
                [DVC, "remote", "add", "-d", "shared", str(remote)], ["git", "add", "-A"],
                ["git", "commit", "-qm", "project, shared DVC remote"], ["git", "push", "-q", "origin", "main"]):
        shell(alice, server, *cmd)

    # Alice: an experiment; commit what it changed, push outputs, commit and experiment
    shell(alice, server, DVC, "exp", "run", "--name", "alice-base", *sets(*WEAK))
    shell(alice, server, "git", "add", "dvc.lock", "params.yaml", "metrics.json", "plots", "artifacts/register.json")
    assert shell(alice, server, "git", "diff", "--name-only").stdout.strip() == "", \
        "the experiment changed a tracked file the workflow does not commit"
    shell(alice, server, "git", "commit", "-qm", "quick start baseline")
    shell(alice, server, DVC, "push")
    shell(alice, server, "git", "push", "-q", "origin", "main")
    shell(alice, server, DVC, "exp", "push", "origin", "alice-base")
    client = mlflow.MlflowClient(server, registry_uri=server)
    alice_run = json.loads((alice / "artifacts/train/mlflow_run.json").read_text())["run_id"]

    # Bob: a clone at another path; her run arrives without her paths and re-evaluates here
    shell(tmp_path, server, "git", "clone", "-q", str(origin), str(bob))
    shell(bob, server, DVC, "pull", "train")
    for name in ("mlflow_run.json", "train_result.json"):
        assert str(alice) not in (bob / "artifacts/train" / name).read_text()
    shell(bob, server, DVC, "exp", "pull", "origin", "alice-base")
    evaluated = shell(bob, server, DVC, "exp", "run", *sets(*WEAK, "tracking.num_overlays=1"))
    assert "Running stage 'train'" not in evaluated.stdout and "Running stage 'evaluate'" in evaluated.stdout
    assert len(client.get_metric_history(alice_run, "val_best/mean_iou")) == 2  # her run, evaluated again by Bob
    shell(bob, server, "git", "checkout", "--", ".")

    # Bob: a variant through the queue, then the promotion
    shell(bob, server, DVC, "exp", "run", "--queue", "--name", "bob-variant", *sets(*STRONG))
    shell(bob, server, DVC, "queue", "start", "-j", "1")
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        status = shell(bob, server, DVC, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Success" in status, status
    shown = shell(bob, server, sys.executable, "-m", "fcnseg.cli", "models", "fcn-voc").stdout
    versions = {v.version: v for v in client.search_model_versions("name='fcn-voc'")}
    assert len(versions) == 2, shown
    bob_version = max(versions, key=int)
    promoted = shell(bob, server, sys.executable, "-m", "fcnseg.cli", "promote", "fcn-voc", str(bob_version))
    champion = client.get_model_version_by_alias("fcn-voc", "champion")
    assert str(champion.version) == str(bob_version), promoted.stdout
    first = client.get_model_version("fcn-voc", min(versions, key=int))
    assert champion.tags["data_version"] == first.tags["data_version"]  # compared like for like
    baseline = shell(bob, server, "git", "rev-parse", "HEAD").stdout.strip()
    assert (champion.tags["dvc_exp_name"], champion.tags["dvc_exp_baseline"]) == ("bob-variant", baseline)
    assert champion.tags["git_commit"] == baseline and champion.tags["git_dirty"] == "false"
    plan = shell(bob, server, sys.executable, "-m", "fcnseg.cli", "reproduce", "models:/fcn-voc@champion").stdout
    assert "dvc exp apply bob-variant" in plan and "dvc repro" in plan
