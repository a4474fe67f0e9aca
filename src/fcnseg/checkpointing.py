"""Atomic checkpoint writes: a kill during a save leaves the previous checkpoint intact and usable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, fsyncs it, then renames it over the old one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file, fsync, rename: never a half-written file at ``path``."""
    path = Path(path)
    AtomicCheckpointIO().save_checkpoint(obj, path)
    return path


def save_model_checkpoint(net: torch.nn.Module, net_config: dict[str, Any], path: str | Path,
                          normalization: str, class_names: list[str]) -> Path:
    """A checkpoint in the layout training writes (``hyper_parameters`` + ``state_dict`` of ``net.*``), so
    ``fcnseg predict``/``evaluate``, MLflow logging and ``init_from`` treat it like a trained one."""
    import lightning

    hyper_parameters = {
        "net": {"_target_": "fcnseg.models.build_fcn", **net_config},
        "optim": {"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 1e-4, "momentum": 0.9}},
        "num_classes": len(class_names),
        "normalization": normalization,
        "class_names": list(class_names),
    }
    checkpoint = {
        "state_dict": {f"net.{key}": value for key, value in net.state_dict().items()},
        "hyper_parameters": hyper_parameters,
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    return atomic_torch_save(checkpoint, path)


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
