"""The fcnseg checkpoint format, in one place: written by training (Lightning), ``import-weights`` and the MLflow
model; read and turned back into a net by everything that predicts (``predict``, ``evaluate``, serving).

A checkpoint is a ``torch.save``d dict with
- ``state_dict``: the net's tensors under ``net.`` (the LightningModule's attribute), plus, from training only,
  optimiser state, loop counters and callback states next to it;
- ``hyper_parameters``: ``net`` (``fcnseg.models.build_fcn``'s arguments), ``normalization`` (what input the
  weights expect), ``class_names``, ``num_classes``, ``dataset`` (:meth:`DatasetSpec.to_metadata`: name, class
  names, palette, ignore index, source) and, from training, ``optim``. Checkpoints written before ``dataset`` was
  recorded read back as VOC (:meth:`DatasetSpec.from_metadata`).
Read with ``weights_only=True`` and without Lightning: a checkpoint can never run code, and loading one to predict
does not pay Lightning's import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcnseg.data.dataset_spec import DatasetSpec
from fcnseg.errors import CheckpointError, one_line
from fcnseg.models.fcn import build_fcn
from fcnseg.models.weights import NET_PREFIX

# what rebuilding the net for inference needs
NET_HPARAMS = ("net", "num_classes", "normalization", "class_names", "dataset")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, rename: never a half-written file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    return path


def save_net_checkpoint(net: nn.Module, net_config: dict[str, Any], path: str | Path, normalization: str,
                        class_names: list[str], dataset: DatasetSpec | None = None) -> Path:
    """A net alone (``import-weights``, tests, benchmarks) in the checkpoint format, so ``fcnseg predict`` /
    ``evaluate``, MLflow logging and ``model.init_from`` treat it like a trained one. ``dataset``: the classes'
    metadata (default: from ``class_names``, VOC's palette for VOC's names)."""
    dataset = dataset or DatasetSpec.from_metadata(None, class_names=class_names)
    hyper_parameters = {
        "net": {"_target_": "fcnseg.models.build_fcn", **net_config},
        "num_classes": len(class_names),
        "normalization": normalization,
        "class_names": list(class_names),
        "dataset": dataset.to_metadata(),
    }
    state_dict = {f"{NET_PREFIX}{key}": value for key, value in net.state_dict().items()}
    return atomic_torch_save({"state_dict": state_dict, "hyper_parameters": hyper_parameters}, path)


def weights_only(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint that predicting needs: the net's tensors and :data:`NET_HPARAMS`. Optimiser
    state, loop counters, RNG and callback states are left out (a training checkpoint holds about twice this)."""
    hparams = checkpoint["hyper_parameters"]
    return {
        "state_dict": {key: value for key, value in checkpoint["state_dict"].items() if key.startswith(NET_PREFIX)},
        "hyper_parameters": {key: hparams[key] for key in NET_HPARAMS if key in hparams},
    }


def read_checkpoint(path: str | os.PathLike) -> dict:
    """An fcnseg checkpoint (see the module's docstring); a missing, corrupt or foreign file is a one-line
    CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; pass a .ckpt written by fcnseg train or "
                              f"import-weights")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}: {one_line(exc)}); it must be "
                              f"a .ckpt written by fcnseg train or import-weights") from exc
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not (isinstance(hparams, Mapping) and isinstance(hparams.get("net"), Mapping) and "state_dict" in checkpoint):
        raise CheckpointError(f"{path} is not an fcnseg checkpoint (no model hyperparameters or state_dict)")
    return checkpoint


def load_checkpoint_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``model.load_state_dict(state)``, a mismatch being a one-line CheckpointError naming the checkpoint."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match its recorded model: {one_line(exc)}") from exc


def inference_net_config(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """``build_fcn``'s arguments for the checkpoint's net, without fetching a backbone: the checkpoint holds every
    weight."""
    net = dict(checkpoint["hyper_parameters"]["net"])
    net.pop("_target_", None)
    return {**net, "backbone_weights": None}


def dataset_of(checkpoint: Mapping[str, Any]) -> DatasetSpec:
    """The dataset a checkpoint's net was trained on (class names, palette, ignore index); VOC for old files."""
    hparams = checkpoint["hyper_parameters"]
    return DatasetSpec.from_metadata(hparams.get("dataset"), hparams.get("num_classes"), hparams.get("class_names"))


def build_net(path: str | os.PathLike) -> tuple[nn.Module, str, DatasetSpec]:
    """The checkpoint's net with its weights (eval mode), the input normalisation they expect, and its dataset's
    class metadata."""
    checkpoint = read_checkpoint(path)
    net = build_fcn(**inference_net_config(checkpoint))
    state = {key[len(NET_PREFIX):]: value for key, value in checkpoint["state_dict"].items()
             if key.startswith(NET_PREFIX)}
    load_checkpoint_state(net, state, path)
    return net.eval(), checkpoint["hyper_parameters"].get("normalization", "imagenet"), dataset_of(checkpoint)
