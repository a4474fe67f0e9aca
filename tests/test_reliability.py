"""Faults survived and bad input refused: killed training, torn checkpoint writes, non-finite loss, MLflow going
away, corrupt data behind DataLoader workers. Each test runs the real thing (subprocesses, real signals)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tests.servers import free_port, start_mlflow_server, stop
from tests.tiny import ROOT, subprocess_env, tiny_overrides, train_command, train_in_process


def final_val_metrics(out: Path) -> dict[str, float]:
    """The last epoch's validation metrics from the run's CSV log."""
    import csv

    rows = [row for row in csv.DictReader((out / "metrics.csv").open()) if row.get("val/mean_iou")]
    last = rows[-1]
    return {key: float(last[key]) for key in ("epoch", "val/pixel_acc", "val/mean_acc", "val/mean_iou",
                                              "val/fw_iou", "val/loss")}


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_and_ends_like_an_uninterrupted_run(tmp_path):
    epochs = 3
    common = ["data.synthetic.num_train=48", "data.datamodule.num_workers=2"]  # several steps per epoch, workers
    reference = tmp_path / "reference"  # uninterrupted, in-process: only the killed run needs its own process
    train_in_process(tiny_overrides(reference, epochs=epochs) + common)

    resumed = tmp_path / "resumed"
    command = train_command(tiny_overrides(resumed, epochs=epochs) + common)
    process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    last = resumed / "out" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    # kill once epoch 0 is checkpointed, a moment into epoch 1 (mid-epoch)
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 0:
                break
        except Exception:  # read while being replaced: try again
            pass
        time.sleep(0.05)
    time.sleep(0.3)
    assert process.poll() is None, "training finished before it could be killed; make it longer"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(last, weights_only=True)
    assert killed_at["epoch"] < epochs - 1  # really interrupted before the end
    run_before = json.loads((resumed / "out" / "mlflow_run.json").read_text())["run_id"]

    # the same command again: resumes from last.ckpt (ckpt_path=last), continues the same MLflow run
    subprocess.run(command, cwd=ROOT, env=subprocess_env(), check=True, capture_output=True, timeout=600)
    assert json.loads((resumed / "out" / "mlflow_run.json").read_text())["run_id"] == run_before
    assert final_val_metrics(resumed / "out") == final_val_metrics(reference / "out")

    client = mlflow.MlflowClient(f"sqlite:///{resumed / 'mlflow.db'}")
    run = client.get_run(run_before)
    assert run.info.status == "FINISHED"
    val_epochs = {int(m.value) for m in client.get_metric_history(run_before, "epoch")}
    assert val_epochs == set(range(epochs))


WRITER = """
import sys, torch
from fcnseg.models.checkpoint import atomic_torch_save
path = sys.argv[1]
i = 0
while True:
    i += 1
    atomic_torch_save({"step": i, "weights": torch.full((2_000_000,), float(i))}, path)
    print(i, flush=True)
"""


def test_kill_during_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    path = tmp_path / "last.ckpt"
    for attempt in range(3):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                   env=subprocess_env())
        for _ in range(2 + attempt):  # a few complete writes, then kill while the next one is in flight
            process.stdout.readline()
        time.sleep(0.01 * attempt)
        process.send_signal(signal.SIGKILL)
        process.wait()
        checkpoint = torch.load(path, weights_only=True)  # never torn: the old or the new one, whole
        assert torch.all(checkpoint["weights"] == float(checkpoint["step"]))


def test_non_finite_loss_stops_with_the_step_and_the_kept_last_good_checkpoint(voc_root, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from fcnseg.checkpointing import AtomicCheckpointIO
    from fcnseg.data import VOCDataModule
    from fcnseg.errors import FcnsegError
    from fcnseg.module import SegmentationModule, load_module
    from tests.test_module import NET, SGD

    class PoisonWeightsInEpoch1(Callback):  # the fault: weights blow up during the second epoch
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                with torch.no_grad():
                    pl_module.net.conv1_1.weight.fill_(float("inf"))

    datamodule = VOCDataModule(str(voc_root), batch_size=2, val_batch_size=2, num_workers=0,
                               train_transform={"crop_size": 32})
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/mean_iou", mode="max",
                                 save_last=True)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoint, PoisonWeightsInEpoch1()],
                        plugins=[AtomicCheckpointIO()])
    with pytest.raises(FcnsegError) as info:
        trainer.fit(SegmentationModule(net=dict(NET), optim=dict(SGD)), datamodule=datamodule)
    message = str(info.value)
    assert "\n" not in message and "non-finite" in message
    assert f"step {3 + 1}" in message  # 3 steps in epoch 0 (6 images, batch 2), poisoned at the 2nd of epoch 1
    assert str(tmp_path / "last.ckpt") in message
    kept = load_module(tmp_path / "last.ckpt")  # the last good checkpoint is intact and finite
    assert all(torch.isfinite(p).all() for p in kept.parameters())


def test_unreachable_tracking_server_is_reported_within_seconds(tmp_path):
    overrides = tiny_overrides(tmp_path, epochs=1)
    overrides = [o for o in overrides if not o.startswith("tracking.tracking_uri=")]
    overrides.append(f"tracking.tracking_uri=http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = subprocess.run(train_command(overrides), cwd=ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "unreachable" in lines[0] and "tracking.enabled=false" in lines[0]
    assert "Traceback" not in result.stderr
    # said before torch, Lightning and the data are set up (the check itself has a 3-s timeout): no data written
    assert not (tmp_path / "data").exists()
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_tracking_server_gone_mid_run_training_finishes_locally_and_syncs_later(tmp_path, mlflow_store_template):
    db, port = tmp_path / "server.db", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(db, port, template=mlflow_store_template)
    overrides = [o for o in tiny_overrides(tmp_path, epochs=3) if not o.startswith("tracking.tracking_uri=")]
    overrides += [f"tracking.tracking_uri={uri}", "data.synthetic.num_train=32"]
    process = subprocess.Popen(train_command(overrides), cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 300
        while not last.is_file() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
    finally:
        stop(server)  # the server disappears after the first epoch
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    out = tmp_path / "out"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2  # trained to the end
    assert (out / "checkpoints" / "best.ckpt").is_file()
    result = json.loads((out / "train_result.json").read_text())
    assert result.get("tracking_failed")
    assert f"fcnseg sync-run {out}" in stderr

    server = start_mlflow_server(db, port)  # back again: log what was missed
    try:
        synced = subprocess.run([sys.executable, "-m", "fcnseg.cli", "sync-run", str(out)], cwd=ROOT,
                                env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert synced.returncode == 0, synced.stderr[-3000:]
        client = mlflow.MlflowClient(uri)
        run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
        steps = {m.step for m in client.get_metric_history(run_id, "val/mean_iou")}
        assert len(steps) == 3  # all three epochs, although the server saw only the first live
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert "evaluation" in artifacts and "checkpoints" not in artifacts  # weights travel in the logged model
    finally:
        stop(server)


def test_corrupt_label_behind_dataloader_workers_is_one_clear_line(tmp_path):
    """A corrupt file read in a worker process ends the run with the project's one-line error naming the file."""
    from fcnseg.data.prepare import prepare

    overrides = tiny_overrides(tmp_path, epochs=1, tracking=False) + ["data.datamodule.num_workers=2"]
    data_root = tmp_path / "data" / "synthetic" / "VOC2012"
    prepare({"source": "synthetic", "root": str(data_root),
             "synthetic": {"seed": 0, "num_train": 16, "num_val": 6, "num_test": 4, "height": 48, "width": 48}},
            tmp_path / "data")  # the parameters tiny_overrides gives, so training finds this dataset complete
    victim = sorted((data_root / "SegmentationClass").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:60])  # truncated PNG
    result = subprocess.run(train_command(overrides), cwd=ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and victim.name in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
