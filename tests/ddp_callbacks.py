"""Callbacks that tests add to real training runs through the ``callbacks`` config group
(``+callbacks.<name>._target_=tests.ddp_callbacks.<Class>``): a callback a user might write, and a fault."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback


class ReadMetricsOnRankZero(Callback):
    """What a progress bar, a logger or a user's callback does on global rank 0 alone: read every kind of logged
    metric at every hook where they change. If reading them issued a collective, the ranks would stop pairing."""

    def _read(self, trainer) -> None:
        if trainer.is_global_zero:
            for metrics in (trainer.callback_metrics, trainer.progress_bar_metrics, trainer.logged_metrics):
                dict(metrics)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._read(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._read(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._read(trainer)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._read(trainer)

    def on_validation_end(self, trainer, pl_module):
        self._read(trainer)


class StallOnRank(Callback):
    """A rank that is slower than the collective timeout: ``rank`` sleeps ``seconds`` at the start of ``epoch``."""

    def __init__(self, rank: int = 1, epoch: int = 1, seconds: float = 20.0) -> None:
        self.rank, self.epoch, self.seconds = rank, epoch, seconds

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.global_rank == self.rank and trainer.current_epoch == self.epoch:
            time.sleep(self.seconds)
