"""Multi-process training for real: `trainer=ddp` with 2 CPU processes (gloo) through the real entry points.

Each test starts real processes (Lightning's own launcher, torchrun, the DVC stage's command), with a real SQLite
MLflow store, and checks what a user relies on: one MLflow run, exact metrics, files written once, faults that end
the job instead of hanging it, and a resume after a killed rank.
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
import numpy as np
import pytest

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


def test_ddp_through_the_entry_point_logs_once_and_its_val_iou_equals_a_single_process_evaluate(tmp_path):
    from fcnseg.evaluate import evaluate_checkpoint

    voc = varied_voc(tmp_path / "VOC2012")
    overrides = ddp_overrides(tmp_path) + ["data.source=voc", f"data.root={voc}",
                                           "data.datamodule.train_transform.crop_size=32",
                                           "data.datamodule.val_batch_size=4"]
    result = run(train_command(overrides))
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert output.count("Initializing distributed: GLOBAL_RANK") == 2
    assert "sync_dist=True" not in output  # values torchmetrics reduced are logged as Lightning expects

    [mlflow_run] = runs_in(tmp_path / "mlflow.db")  # exactly one run for the two processes
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(mlflow_run.info.run_id, "val/mean_iou")
    assert len(history) == 2  # one value per epoch, not one per rank
    out = tmp_path / "out"
    recorded = json.loads((out / "mlflow_run.json").read_text())
    trained = json.loads((out / "train_result.json").read_text())
    assert recorded["run_id"] == trained["run_id"] == mlflow_run.info.run_id and trained["model_uri"]
    assert "config.yaml" in {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}

    # 13 images of different sizes on 2 ranks, validated whole and alone: the same score a single process gives
    single = evaluate_checkpoint(out / "checkpoints" / "best.ckpt", voc, "val")
    assert abs(float(single.results["mean_iou"]) - trained["best_score"]) < 1e-6
    assert abs(max(m.value for m in history) - trained["best_score"]) < 1e-6


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


def test_dvc_train_stage_under_ddp_writes_its_outputs_once(tmp_path):
    # The DVC stage's command (python -m fcnseg.pipeline train), which Lightning re-runs for rank 1.
    params = tmp_path / "params.yaml"
    compose = [sys.executable, "-m", "fcnseg.pipeline", "params", "--params", str(params),
               *[o for o in ddp_overrides(tmp_path, epochs=1) if not o.startswith("paths.output_dir=")]]
    assert run(compose).returncode == 0
    result = run([sys.executable, "-m", "fcnseg.pipeline", "train", "--params", str(params)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    train_dir = tmp_path / "artifacts" / "train"
    assert (train_dir / "checkpoints" / "best.ckpt").is_file()
    assert json.loads((train_dir / "train_result.json").read_text())["model_uri"]
    assert len(runs_in(tmp_path / "mlflow.db")) == 1


def test_multirun_with_ddp_is_refused_in_one_line(tmp_path):
    overrides = [o for o in ddp_overrides(tmp_path) if not o.startswith(("model=", "paths.output_dir="))]
    result = run(train_command(["-m", "model=fcn32s,fcn8s", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]))
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "multirun" in line and "for m in" in line
    assert not (tmp_path / "sweep" / "0" / "checkpoints").exists()


NON_FINITE_ON_ONE_RANK = """
import sys
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from fcnseg.cli_errors import exit_on_user_error
from fcnseg.data import VOCDataModule
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
                        strategy=DDPStrategy(timeout=timedelta(seconds=45)))
    trainer.fit(SegmentationModule(net=dict(NET), optim=dict(SGD)), datamodule=datamodule)
"""


def test_non_finite_loss_on_one_rank_stops_every_rank_with_the_one_line_error(tmp_path):
    voc = varied_voc(tmp_path / "VOC2012", num_train=16, num_val=4)
    script = tmp_path / "poison.py"
    script.write_text(NON_FINITE_ON_ONE_RANK)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(script), str(voc)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**subprocess_env(), "PYTHONPATH": str(ROOT)})
    assert time.monotonic() - started < 90  # ~20 s of start-up, then stopped within the epoch, not after 50 epochs
    assert result.returncode == 2, result.stderr[-3000:]
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
    overrides = ddp_overrides(tmp_path, epochs=5) + ["data.synthetic.num_train=64"]
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
    assert len({m.step for m in client.get_metric_history(trained["run_id"], "val/mean_iou")}) == 5
