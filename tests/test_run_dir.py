"""The training run's owner (run_dir.py), in process: a run dir holds no absolute path (record, result,
checkpoints), so moved elsewhere it resumes with its best checkpoint found; a DVC stage's resumable state and its
set-aside previous run."""

from __future__ import annotations

import json
import shutil

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from omegaconf import OmegaConf

from fcnseg import run_dir
from fcnseg.checkpointing import RelocatableCheckpoints
from fcnseg.run_dir import RunDir


def strings_in(tree) -> list[str]:
    if isinstance(tree, dict):
        return [s for key, value in tree.items() for s in strings_in(key) + strings_in(value)]
    if isinstance(tree, (list, tuple)):
        return [s for item in tree for s in strings_in(item)]
    return [tree] if isinstance(tree, str) else []


def project(path, monkeypatch):
    path.mkdir(parents=True, exist_ok=True)
    (path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(path)
    return path


def test_run_record_and_result_name_no_absolute_path_and_follow_the_project(tmp_path, monkeypatch):
    first = project(tmp_path / "a", monkeypatch)
    run = RunDir("artifacts/train")
    run.write_record("abc", f"sqlite:///{first / 'mlflow.db'}", experiment_id="7")
    run.write_result({"best_checkpoint": str(run.best), "best_score": 0.5, "run_id": "abc",
                      "output_dir": str(first / run.path)})
    for name in (run_dir.RECORD, run_dir.RESULT):
        assert str(tmp_path) not in (run.path / name).read_text(), name
    assert run.read_record() == {"run_id": "abc", "experiment_id": "7", "tracking_uri": f"sqlite:///{first / 'mlflow.db'}"}

    second = tmp_path / "b"  # pulled by a teammate into another checkout
    shutil.copytree(first, second)
    monkeypatch.chdir(second)
    assert run.read_record()["tracking_uri"] == f"sqlite:///{second / 'mlflow.db'}"
    assert run.read_result()["best_checkpoint"] == str(run.best)
    run.write_record("abc", "http://127.0.0.1:5000")  # a team server is kept as it is
    assert run.read_record()["tracking_uri"] == "http://127.0.0.1:5000"


class LoggingModel(BoringModel):
    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("valid_loss", loss)
        return loss


def fit(run: RunDir, epochs: int, ckpt_path=None) -> ModelCheckpoint:
    best = ModelCheckpoint(dirpath=run.checkpoints, filename=run_dir.BEST, monitor="valid_loss", mode="min",
                           enable_version_counter=False)
    last = ModelCheckpoint(dirpath=run.checkpoints, filename=run_dir.LAST, monitor=None,
                           enable_version_counter=False)
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=[best, last, RelocatableCheckpoints()])
    trainer.fit(LoggingModel(), ckpt_path=ckpt_path)
    return best


def test_a_moved_run_dir_resumes_with_its_best_checkpoint_in_the_new_place(tmp_path):
    first = RunDir(tmp_path / "machine-a" / "train")
    fit(first, epochs=1)
    saved = torch.load(first.last, weights_only=False)
    absolute = [s for s in strings_in(saved) if str(tmp_path) in s]
    assert absolute == []  # Lightning alone writes dirpath, best_model_path, best_k_models absolute

    moved = RunDir(tmp_path / "machine-b" / "train")
    shutil.copytree(first.path, moved.path)
    shutil.rmtree(first.path)  # the other machine's path does not exist here
    best = fit(moved, epochs=2, ckpt_path=str(moved.last))
    assert best.best_model_path.startswith(str(moved.checkpoints)) and moved.best.is_file()
    assert all(path.startswith(str(moved.checkpoints)) for path in best.best_k_models)


def test_stage_run_resumes_from_the_stash_or_starts_over_with_the_old_run_set_aside(tmp_path, monkeypatch):
    project(tmp_path, monkeypatch)
    config = {"optim": {"lr": 0.001}, "trainer": {"max_epochs": 2}, "data": {"datamodule": {"num_workers": 0}}}
    run = RunDir("artifacts/train")

    def write_run(target: RunDir, cfg: dict, marker: str) -> None:
        target.write_config(OmegaConf.create(cfg))
        target.last.parent.mkdir(parents=True, exist_ok=True)
        target.last.write_text(marker)
        target.record_file.write_text(json.dumps({"run_id": marker, "store": "mlflow.db"}))

    # workers do not change what is trained: the same stash
    assert run_dir.stash_for(config) == run_dir.stash_for({**config, "data": {"datamodule": {"num_workers": 8}}})
    stash = run_dir.stash_for(config)
    assert stash.path.is_relative_to(tmp_path / ".dvc" / "tmp")

    # DVC restored HEAD's run (another config) over the interrupted one; the stash holds the interrupted state
    write_run(run, {**config, "optim": {"lr": 0.1}}, "head")
    write_run(stash, config, "interrupted")
    aside = run_dir.start_stage_run(run, stash, config)
    assert run.last.read_text() == "interrupted" and run.read_record()["run_id"] == "interrupted"
    assert aside is not None and aside.last.read_text() == "head"  # kept, not deleted
    assert not aside.path.is_relative_to(tmp_path / "artifacts")

    # the same config in place (dvc repro): resumed where it is, nothing moved
    assert run_dir.start_stage_run(run, run_dir.stash_for({"other": 1}), config) is None
    assert run.last.read_text() == "interrupted"

    # another config, no stash: set aside; a new run that fails before its first checkpoint gives it back
    other = {**config, "optim": {"lr": 0.5}}
    aside = run_dir.start_stage_run(run, run_dir.stash_for(other), other)
    assert not run.path.exists() and aside.last.read_text() == "interrupted"
    run.path.mkdir(parents=True)
    run_dir.restore_aside(run, aside)
    assert run.last.read_text() == "interrupted" and not aside.path.exists()


def test_copying_a_run_again_into_its_stash_leaves_no_temporary_file(tmp_path):
    # The stash's files are hard links of the run's: copying again links onto the same file, where rename() does
    # nothing and would leave the temporary link behind at every epoch
    run, stash = RunDir(tmp_path / "run"), RunDir(tmp_path / "stash")
    run.checkpoints.mkdir(parents=True)
    run.last.write_bytes(b"last")
    (run.path / "config.yaml").write_text("seed: 1\n")
    assert run_dir.copy_resumable(run, stash) and run_dir.copy_resumable(run, stash)
    run.last.write_bytes(b"newer")  # in place (the same inode): still the one file in both
    assert run_dir.copy_resumable(run, stash)
    assert stash.last.read_bytes() == b"newer" and (stash.path / "config.yaml").is_file()
    assert not [p.name for p in stash.path.rglob("*") if ".tmp-" in p.name]
