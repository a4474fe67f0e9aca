"""Callbacks and loggers are Hydra config groups: the defaults are what training always had, a user adds, drops or
swaps one with an override, and the checkpoint callbacks write to the run's own folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from fcnseg.checkpointing import RngStateCheckpoint
from fcnseg.errors import ConfigError
from fcnseg.train import build_callbacks, build_loggers
from tests.tiny import compose


def composed(*overrides: str):
    return compose(["experiment=quickstart", *overrides])


def test_the_default_callbacks_and_loggers_are_the_ones_training_always_had(tmp_path):
    callbacks = build_callbacks(composed(), tmp_path / "checkpoints")
    assert list(callbacks) == ["best_checkpoint", "last_checkpoint", "rng_state", "lr_monitor"]
    best, last = callbacks["best_checkpoint"], callbacks["last_checkpoint"]
    assert isinstance(best, ModelCheckpoint) and best.monitor == "val/mean_iou" and best.mode == "max"
    assert isinstance(last, ModelCheckpoint) and last.monitor is None and last.filename == "last"
    assert Path(best.dirpath) == Path(last.dirpath) == (tmp_path / "checkpoints").resolve()
    assert isinstance(callbacks["rng_state"], RngStateCheckpoint)
    assert isinstance(callbacks["lr_monitor"], LearningRateMonitor)
    [csv] = build_loggers(composed(), tmp_path)
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir) == tmp_path


def test_early_stopping_is_one_override_and_a_callback_can_be_added_or_dropped(tmp_path):
    callbacks = build_callbacks(composed("callbacks=early_stopping"), tmp_path)
    assert isinstance(callbacks["early_stopping"], EarlyStopping)
    assert callbacks["early_stopping"].monitor == "val/mean_iou" and "best_checkpoint" in callbacks
    callbacks = build_callbacks(composed("~callbacks.lr_monitor", "callbacks.early_stopping.patience=3",
                                         "callbacks=early_stopping"), tmp_path)
    assert "lr_monitor" not in callbacks and callbacks["early_stopping"].patience == 3
    added = build_callbacks(composed("+callbacks.bar._target_=lightning.pytorch.callbacks.TQDMProgressBar"), tmp_path)
    assert type(added["bar"]).__name__ == "TQDMProgressBar"


def test_training_without_a_best_checkpoint_callback_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="callbacks.best_checkpoint must be"):
        build_callbacks(composed("~callbacks.best_checkpoint"), tmp_path)
