"""Lightning's side of checkpoints: atomic writes (a kill during a save leaves the previous checkpoint intact and
usable) and the RNG states a resumed run needs. The format itself is :mod:`fcnseg.models.checkpoint`'s."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fcnseg.models.checkpoint import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, fsyncs it, then renames it over the old one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)


class RngStateCheckpoint(Callback):
    """Saves the Python/NumPy/torch RNG states with each checkpoint and restores them on resume.

    Lightning restores weights, optimiser and loop position but not the RNGs, so a resumed run would shuffle,
    augment and drop out differently from an uninterrupted one. With them restored, a run killed and resumed
    from its last checkpoint ends exactly where the uninterrupted run does (deterministic mode, CPU).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    # NumPy's state holds an ndarray, which `torch.load(weights_only=True)` refuses: stored as a tensor instead.
    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        kind, keys, pos, has_gauss, cached = states.pop("numpy")
        states["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
        return {"rng_states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = dict(state_dict.get("rng_states") or {})
        if "numpy" in states:
            kind, keys, pos, has_gauss, cached = states["numpy"]
            states["numpy"] = (kind, keys.numpy().astype("uint32"), pos, has_gauss, cached)
        self._pending = states or None

    def on_train_start(self, trainer, pl_module) -> None:
        # restored here, after Lightning's own setup has drawn from the RNGs, right before the loop goes on
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None
