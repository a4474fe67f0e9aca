"""Multi-process training for real: `trainer=ddp` with 2 CPU processes (gloo) through the real entry points.

Each test starts real processes (Lightning's own launcher, torchrun, the DVC stage's command), with a real SQLite
MLflow store, and checks what a user relies on: one MLflow run, exact metrics, files written once, faults that end
the job instead of hanging it, and a resume after a killed rank.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.servers import free_port
from tests.test_pipeline_e2e import TINY, fresh_project  # noqa: F401 (a fixture)
from tests.test_pipeline_e2e import run as run_in_project
from tests.tiny import ROOT, subprocess_env, tiny_overrides, train_command
from tests.voc_layout import random_sample, write_voc_layout

DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
pytestmark = pytest.mark.slow


def varied_voc(root: Path, num_train: int = 8, num_val: int = 13) -> Path:
    """A VOC-layout split whose val images differ in size (as VOC's do) and do not divide by 2 ranks."""
    rng = np.random.default_rng(0)
    samples, splits = {}, {"train": [], "val": []}
    for split, count in (("train", num_train), ("val", num_val)):
        for index in range(count):
            height, width = int(rng.integers(30, 58)), int(rng.integers(30, 58))
            image_id = f"2008_{split}{index:03d}"
            samples[image_id] = random_sample(rng, height, width)
            splits[split].append(image_id)
    return write_voc_layout(root, samples, splits)


def ddp_overrides(tmp: Path, epochs: int = 2) -> list[str]:
    return tiny_overrides(tmp, epochs=epochs) + DDP_CPU


def run(command: list[str], cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def runs_in(store: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def documented_command(startswith: str, page: str = "docs/multi-gpu.md") -> list[str]:
    """A command exactly as the docs show it (its arguments after ``python -m fcnseg.train``), so what is tested is
    what users copy."""
    for line in (ROOT / page).read_text().splitlines():
        if line.strip().startswith(startswith):
            return shlex.split(line.split("#")[0])[3:]
    raise AssertionError(f"{page} shows no command starting with {startswith!r}")


def with_tiny_sizes(command: list[str], tmp: Path, **kwargs) -> list[str]:
    """The command plus tiny sizes: only what the command itself does not set; the progress bar, callbacks,
    loggers and data-loading workers stay as the user gets them."""
    keys = {arg.split("=", 1)[0] for arg in command} | {"data.datamodule.num_workers"}
    return command + [o for o in tiny_overrides(tmp, **kwargs) if o.split("=", 1)[0] not in keys]


def check_one_run_with_exact_metrics(tmp_path: Path, output: str, voc: Path, ranks: int, epochs: int = 2) -> None:
    from fcnseg.evaluate import evaluate_checkpoint

    assert output.count("Initializing distributed: GLOBAL_RANK") == ranks
    assert "sync_dist=True" not in output  # values torchmetrics reduced are logged as Lightning expects
    [mlflow_run] = runs_in(tmp_path / "mlflow.db")  # exactly one run for all processes
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(mlflow_run.info.run_id, "val/mean_iou")
    assert len({m.step for m in history}) == len(history) >= epochs  # one value per validation, not one per rank
    out = tmp_path / "out"
    recorded = json.loads((out / "mlflow_run.json").read_text())
    trained = json.loads((out / "train_result.json").read_text())
    assert recorded["run_id"] == trained["run_id"] == mlflow_run.info.run_id and trained["model_uri"]
    assert "config.yaml" in {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    # images of different sizes on several ranks, validated whole and alone: the score a single process gives
    single = evaluate_checkpoint(out / "checkpoints" / "best.ckpt", voc, "val")
    assert abs(float(single.results["mean_iou"]) - trained["best_score"]) < 1e-6
    assert abs(max(m.value for m in history) - trained["best_score"]) < 1e-6


@pytest.mark.parametrize("ranks", [2, 3])
def test_the_documented_ddp_command_with_every_default_logs_once_and_matches_a_single_process_evaluate(
        tmp_path, ranks):
    # The docs' CPU DDP line as written (progress bar on: Rich, Lightning's default when rich is installed; the
    # default callbacks and loggers), on 13 val images of different sizes, which no rank count here divides.
    command = documented_command("python -m fcnseg.train experiment=quickstart trainer=ddp")
    command = [f"trainer.devices={ranks}" if arg.startswith("trainer.devices=") else arg for arg in command]
    voc = varied_voc(tmp_path / "VOC2012")
    overrides = with_tiny_sizes(command, tmp_path) + [
        "data.source=voc", f"data.root={voc}", "data.datamodule.train_transform.crop_size=32",
        "data.datamodule.batch_size=2", "data.datamodule.val_batch_size=4"]  # log_every_n_steps=1: below an epoch
    result = run(train_command(overrides))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "━" in result.stdout  # Rich's progress bar really drew (on rank 0)
    check_one_run_with_exact_metrics(tmp_path, output, voc, ranks)


def test_a_rank_slower_than_the_collective_timeout_ends_the_job_with_the_one_line(tmp_path):
    overrides = ddp_overrides(tmp_path, epochs=3) + [
        # shorter than the stall (starting the ranks has its own window, trainer.strategy.join_timeout)
        "trainer.strategy.timeout.seconds=20",
        "+callbacks.stall._target_=tests.ddp_callbacks.StallOnRank", "+callbacks.stall.seconds=32"]
    started = time.monotonic()
    result = run(train_command(overrides))
    assert time.monotonic() - started < 200
    assert result.returncode == 2, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # rank 0 gave up waiting after the timeout; the slow rank found its peer gone: both say what and what to do
    assert "error: rank 0 of 2: a collective call across the training processes failed (" in result.stderr
    assert "; timeout 20 s); another rank died" in result.stderr
    assert lines[-1].startswith("error: rank "), lines[-3:]
    for needle in ("trainer.strategy.timeout.seconds", "resume with: python -m fcnseg.train ",
                   f"paths.output_dir={tmp_path / 'out'}"):
        assert needle in lines[-1]
    assert "Traceback" not in result.stderr


def start_node(overrides: list[str], node_rank: int, port: int) -> subprocess.Popen:
    """One "node" of a job started by hand (Lightning's own environment: MASTER_ADDR/PORT and NODE_RANK)."""
    env = {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node_rank)}
    return subprocess.Popen(train_command(overrides), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_rank_starting_later_than_the_collective_timeout_joins_and_one_that_never_comes_ends_in_one_line(tmp_path):
    # Lightning starts the other ranks only once rank 0 reaches fit, so they join late by their whole start-up (and
    # nodes started by hand, later still): that is trainer.strategy.join_timeout's, not the collective timeout's.
    def two_nodes(tmp: Path) -> list[str]:
        overrides = [o for o in ddp_overrides(tmp, epochs=1) if not o.startswith("trainer.devices=")]
        return overrides + ["trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy.timeout.seconds=5"]

    alone = start_node(two_nodes(tmp_path / "alone") + ["trainer.strategy.join_timeout.seconds=5"], 0, free_port())
    _, stderr = alone.communicate(timeout=200)
    assert alone.returncode == 2, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: rank 0 of 2: the training processes did not all start and reach each other "
                           "within trainer.strategy.join_timeout.seconds=5 ("), last
    assert "Traceback" not in stderr and not (tmp_path / "alone" / "out" / "checkpoints").exists()

    overrides, port = two_nodes(tmp_path), free_port()
    first = start_node(overrides, 0, port)
    _wait_for(tmp_path / "out" / "config.yaml", first, timeout=200)  # rank 0 writes it just before fit
    time.sleep(7)  # rank 0 is waiting for rank 1, longer than the 5-s collective timeout, before rank 1 even starts
    second = start_node(overrides, 1, port)
    outputs = [node.communicate(timeout=300) for node in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], "\n".join(err[-3000:] for _, err in outputs)
    [mlflow_run] = runs_in(tmp_path / "mlflow.db")
    assert json.loads((tmp_path / "out" / "train_result.json").read_text())["run_id"] == mlflow_run.info.run_id


def test_torchrun_ranks_share_one_run_dir_and_one_mlflow_run(tmp_path):
    # No paths.output_dir: Hydra would give each rank its own time-stamped dir; the launcher's run id joins them.
    overrides = [o for o in ddp_overrides(tmp_path, epochs=1) if not o.startswith("paths.output_dir=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fcnseg.train", *overrides]
    result = run(command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dirs = list((tmp_path / "outputs").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("torchrun-"), run_dirs
    assert (run_dirs[0] / "checkpoints" / "best.ckpt").is_file() and (run_dirs[0] / "train_result.json").is_file()
    assert len(runs_in(tmp_path / "mlflow.db")) == 1
    # the synthetic data was written once (under a lock), whole: no leftover temporary copies
    assert [p.name for p in (tmp_path / "data" / "synthetic").iterdir() if not p.name.startswith(".")] == ["VOC2012"]
    assert not [p for p in (tmp_path / "data" / "synthetic").iterdir() if ".tmp-" in p.name]


def test_multirun_with_ddp_is_refused_in_one_line(tmp_path):
    overrides = [o for o in ddp_overrides(tmp_path) if not o.startswith(("model=", "paths.output_dir="))]
    result = run(train_command(["-m", "model=fcn32s,fcn8s", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]))
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "multirun" in line and "hydra/launcher=submitit_slurm" in line and "submitit_local" in line
    assert not (tmp_path / "sweep" / "0" / "checkpoints").exists()


NON_FINITE_ON_ONE_RANK = """
import sys
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from fcnseg.cli_errors import exit_on_user_error
from fcnseg.data import VOCDataModule
from fcnseg.ddp_strategy import DDPStrategy
from fcnseg.module import SegmentationModule
from tests.test_module import NET, SGD


class PoisonRank1(Callback):  # the fault: rank 1's weights blow up in its second epoch; rank 0 is healthy
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.current_epoch == 1 and batch_idx == 0:
            with torch.no_grad():
                pl_module.net.conv1_1.weight.fill_(float("inf"))


with exit_on_user_error():
    datamodule = VOCDataModule(sys.argv[1], batch_size=2, val_batch_size=2, num_workers=0,
                               train_transform={"crop_size": 32})
    trainer = L.Trainer(max_epochs=50, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[PoisonRank1()],
                        strategy=DDPStrategy(timeout=timedelta(seconds=45), join_timeout=timedelta(seconds=300)))
    trainer.fit(SegmentationModule(net=dict(NET), optim=dict(SGD)), datamodule=datamodule)
"""


def test_non_finite_loss_on_one_rank_stops_every_rank_with_the_one_line_error(tmp_path):
    voc = varied_voc(tmp_path / "VOC2012", num_train=16, num_val=4)
    script = tmp_path / "poison.py"
    script.write_text(NON_FINITE_ON_ONE_RANK)
    result = subprocess.run([sys.executable, str(script), str(voc)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**subprocess_env(), "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr[-3000:]  # ended by the error, not after its 50 epochs
    # Both ranks agree (the check is reduced over ranks) and stop with the same line, naming the first bad step
    # (4 steps per epoch per rank; rank 0's loss turns non-finite one step later, through the averaged gradients).
    # The two ranks share stderr, so their lines may interleave: count the message, not the lines.
    assert result.stderr.count("error: non-finite training loss at step 4 (epoch 1); ") == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.5)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_kill_9_of_one_rank_ends_the_job_within_a_minute_and_the_same_command_resumes(tmp_path):
    overrides = ddp_overrides(tmp_path, epochs=3) + ["data.synthetic.num_train=48"]
    command = train_command(overrides)
    process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    _wait_for(last, process, timeout=240)
    [rank1] = [pid for pid in _children(process.pid)
               if "fcnseg.train" in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")]
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    process.communicate(timeout=90)
    assert time.monotonic() - killed < 60
    assert process.returncode != 0

    resumed = run(command)  # the same command, unchanged
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"Restoring states from the checkpoint path at {last}" in resumed.stdout + resumed.stderr
    trained = json.loads((tmp_path / "out" / "train_result.json").read_text())
    [mlflow_run] = runs_in(tmp_path / "mlflow.db")  # the resumed job continued the same MLflow run
    assert mlflow_run.info.run_id == trained["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len({m.step for m in client.get_metric_history(trained["run_id"], "val/mean_iou")}) == 3


def test_mlflow_run_trains_ddp_with_tqdm_and_a_rank_zero_callback_into_the_one_run_it_opened(tmp_path):
    # `mlflow run . -e train` with the distributed settings as parameters and any other override in `overrides`.
    # Inside it: the other progress bar (TQDM), log_every_n_steps above the epoch's batches, validation twice an
    # epoch, val batches that differ in number across ranks (13 images, 3 per batch: 3 batches on rank 0, 2 on
    # rank 1), and a callback that reads every logged metric on rank 0 alone at every hook: none of it may issue a
    # collective.
    voc = varied_voc(tmp_path / "VOC2012")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = " ".join([
        f"data.root={voc}", f"paths.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}",
        "model.net.width=0.0625", "data.datamodule.batch_size=2", "data.datamodule.val_batch_size=3",
        "data.datamodule.num_workers=0", "data.datamodule.train_transform.crop_size=32", "tracking.num_overlays=2",
        "trainer.log_every_n_steps=50", "trainer.val_check_interval=0.5",
        "+callbacks.progress_bar._target_=lightning.pytorch.callbacks.TQDMProgressBar",
        "+callbacks.reader._target_=tests.ddp_callbacks.ReadMetricsOnRankZero"])
    params = {"data": "voc", "model": "fcn8s", "optim": "adamw", "lr": "1e-3", "max_epochs": "2", "trainer": "ddp",
              "accelerator": "cpu", "devices": "2", "precision": "32-true", "backbone_weights": "null",
              "data_dir": str(tmp_path / "data"), "overrides": overrides}
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    command = [mlflow_cli, "run", ".", "-e", "train", "--env-manager", "local", "--experiment-name", "ddp",
               *[arg for key, value in params.items() for arg in ("-P", f"{key}={value}")]]
    env = {**subprocess_env(), "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # `python` = this venv's
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    [mlflow_run] = runs_in(tmp_path / "mlflow.db")  # the run `mlflow run` opened, continued by rank 0 alone
    assert mlflow_run.data.tags.get("mlflow.project.entryPoint") == "train"
    assert mlflow_run.data.params["trainer.devices"] == "2" and mlflow_run.data.params["trainer.accelerator"] == "cpu"
    assert "Epoch 1: 100%" in output  # TQDM drew
    check_one_run_with_exact_metrics(tmp_path, output, voc, ranks=2)
    client = mlflow.MlflowClient(uri)
    assert len(client.get_metric_history(mlflow_run.info.run_id, "val/mean_iou")) == 4  # 2 epochs x 2 validations


def test_two_torchrun_launches_as_two_nodes_make_one_run_written_by_global_rank_0_alone(tmp_path):
    # The documented multi-node torchrun line, with the static rendezvous: 2 "nodes" (launches) of 1 process each on
    # 127.0.0.1, each in its own working directory as on two machines; data and MLflow on "shared storage".
    documented = documented_command("torchrun --nnodes 2", page="docs/multi-gpu.md")
    assert "--rdzv-backend" not in documented  # static: --node-rank decides the ranks (c10d ignores it)
    assert {"--node-rank", "--master-addr", "--master-port", "--rdzv-id", "--nproc-per-node"} <= set(documented)
    voc = varied_voc(tmp_path / "VOC2012")
    port = free_port()
    overrides = [o for o in ddp_overrides(tmp_path) if not o.startswith(("paths.output_dir=", "trainer.devices="))]
    overrides += ["trainer.devices=1", "trainer.num_nodes=2", "data.source=voc", f"data.root={voc}",
                  "data.datamodule.train_transform.crop_size=32", "data.datamodule.batch_size=2"]
    env = {**subprocess_env(), "PYTHONPATH": str(ROOT)}
    nodes = []
    for node_rank in (1, 0):  # the second node may start first: ranks follow --node-rank, not arrival
        cwd = tmp_path / f"node{node_rank}"
        cwd.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "--rdzv-id", "job42", "-m", "fcnseg.train", *overrides]
        nodes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        time.sleep(2)
    outputs = [node.communicate(timeout=400) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[1][-3000:] for out in outputs)
    run_dir = tmp_path / "node0" / "outputs" / "torchrun-job42"
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "train_result.json").is_file()
    # node 1 (global rank 1) wrote none of the run's files: no checkpoint, config, record or result
    written = {p.name for p in (tmp_path / "node1").rglob("*") if p.is_file() and ".hydra" not in p.parts}
    assert not written & {"best.ckpt", "last.ckpt", "config.yaml", "mlflow_run.json", "train_result.json",
                          "metrics.csv"}, written
    [mlflow_run] = runs_in(tmp_path / "mlflow.db")
    trained = json.loads((run_dir / "train_result.json").read_text())
    assert trained["run_id"] == mlflow_run.info.run_id
    from fcnseg.evaluate import evaluate_checkpoint
    single = evaluate_checkpoint(run_dir / "checkpoints" / "best.ckpt", voc, "val")
    assert abs(float(single.results["mean_iou"]) - trained["best_score"]) < 1e-6


def test_dvc_exp_run_with_ddp_trains_the_pipeline_on_two_ranks(fresh_project):
    # The documented DVC line for DDP on CPU, with the quick start's sizes shrunk (progress bar on): every stage,
    # one MLflow run, and the evaluate stage's val mIoU (one process) equal to the best DDP validation.
    dvc = str(Path(sys.executable).with_name("dvc"))
    sets = documented_command("dvc exp run -S experiment=quickstart -S trainer=ddp")
    shrunk = [arg for override in TINY for arg in ("-S", override)]
    result = run_in_project(fresh_project, dvc, "exp", "run", *sets, *shrunk)
    assert (result.stdout + result.stderr).count("Initializing distributed: GLOBAL_RANK") == 2
    trained = json.loads((fresh_project / "artifacts" / "train" / "train_result.json").read_text())
    metrics = json.loads((fresh_project / "metrics.json").read_text())
    assert abs(metrics["mean_iou"] - trained["best_score"]) < 1e-6
    [mlflow_run] = runs_in(fresh_project / "mlflow.db")
    assert mlflow_run.data.params["trainer.devices"] == "2"


def test_a_sweep_of_ddp_jobs_runs_each_as_its_own_distributed_job_under_submitit(tmp_path):
    # `-m` with trainer=ddp through Hydra's submitit launcher (submitit_local here, submitit_slurm on a cluster):
    # 2 jobs, each 2 processes that join as one DDP job; both jobs start at once on a new SQLite store.
    overrides = [o for o in ddp_overrides(tmp_path, epochs=1) if not o.startswith(("model=", "paths.output_dir="))]
    command = train_command(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}", "model=fcn32s,fcn8s", *overrides])
    result = run(command, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*_log.*"))  # .out and .err
    assert logs.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2  # each job: its 2 ranks
    runs = runs_in(tmp_path / "mlflow.db")
    assert sorted(r.data.params["model.net.name"] for r in runs) == ["fcn32s", "fcn8s"]  # one run per job
    for job in ("0", "1"):
        trained = json.loads((tmp_path / "sweep" / job / "train_result.json").read_text())
        assert trained["run_id"] in {r.info.run_id for r in runs} and trained["model_uri"]
