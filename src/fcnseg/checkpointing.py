"""Lightning's side of checkpoints: atomic writes (a kill during a save leaves the previous checkpoint intact and
usable), the RNG states a resumed run needs, and callback state without absolute paths (a run dir moved or pulled
elsewhere resumes). The format itself is :mod:`fcnseg.models.checkpoint`'s."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
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

    # The generators' own public getters and setters (Lightning's helpers for this are private). NumPy's state
    # holds an ndarray, which `torch.load(weights_only=True)` refuses: stored as a tensor instead.
    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        states = {"torch": torch.get_rng_state(), "python": random.getstate(),
                  "numpy": (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)}
        if torch.cuda.is_available():
            states["torch.cuda"] = torch.cuda.get_rng_state_all()
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
            states, self._pending = self._pending, None
            torch.set_rng_state(states["torch"])
            if "torch.cuda" in states:
                torch.cuda.set_rng_state_all(states["torch.cuda"])
            if "numpy" in states:
                np.random.set_state(states["numpy"])
            version, state, gauss = states["python"]
            random.setstate((version, tuple(state), gauss))  # a checkpoint may hold the tuple as a list


_CHECKPOINT_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")


class RelocatableCheckpoints(Callback):
    """Stores every ModelCheckpoint's state with paths relative to its own ``dirpath`` and maps them back to the
    callback's current ``dirpath`` on resume.

    Lightning writes them absolute (``best_model_path``, ``best_k_models``, ``dirpath``), and a resumed run in
    another directory keeps the old ``best_model_path`` (a teammate's pulled run pointed at the other machine's
    path). Its own ``on_save_checkpoint``/``on_load_checkpoint`` run after the callbacks' ``state_dict`` and before
    their ``load_state_dict``, so it rewrites what they store without changing them.
    """

    @staticmethod
    def _states(trainer, checkpoint: dict[str, Any]):
        for callback in trainer.checkpoint_callbacks:
            state = (checkpoint.get("callbacks") or {}).get(callback.state_key)
            if isinstance(callback, ModelCheckpoint) and isinstance(state, dict) and callback.dirpath:
                yield callback, state

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        for callback, state in self._states(trainer, checkpoint):
            relative = lambda path: os.path.relpath(path, callback.dirpath) if path else path  # noqa: E731
            for key in _CHECKPOINT_PATHS:
                state[key] = relative(state.get(key))
            state["best_k_models"] = {relative(path): score for path, score in state.get("best_k_models", {}).items()}
            state["dirpath"] = "."

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        for callback, state in self._states(trainer, checkpoint):
            if state.get("dirpath") != ".":  # written before this callback existed: Lightning's own rules apply
                continue
            here = lambda path: os.path.join(callback.dirpath, path) if path else path  # noqa: E731
            for key in _CHECKPOINT_PATHS:
                state[key] = here(state.get(key))
            state["best_k_models"] = {here(path): score for path, score in state.get("best_k_models", {}).items()}
            state["dirpath"] = callback.dirpath
