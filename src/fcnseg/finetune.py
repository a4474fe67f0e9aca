"""Fine-tuning to a dataset of other classes (``model.finetune_from``): where the trained weights come from (an
fcnseg checkpoint such as ``fcnseg import-weights`` writes, a pytorch-fcn ``.pth``, or a registered model
``models:/NAME@ALIAS``), the check that they expect the input normalisation the config trains with, and the copy
of backbone and fc layers with the score layers re-initialised (:func:`fcnseg.models.weights.load_for_finetuning`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from fcnseg.errors import CheckpointError, ConfigError, one_line
from fcnseg.models.weights import load_for_finetuning

MODEL_URI_PREFIXES = ("models:/", "runs:/")


def _model_weights(uri: str, tracking_uri: str | None, into: Path) -> Path:
    """The weights file of a logged fcnseg PyTorch model (its ``artifacts/weights.pt``), downloaded into ``into``."""
    import mlflow

    from fcnseg.runs import resolve_tracking_uri, using_store

    try:
        with using_store(resolve_tracking_uri(tracking_uri)):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    except Exception as exc:
        raise CheckpointError(f"cannot download model.finetune_from={uri}: {one_line(exc)}; check the name/alias "
                              f"with `fcnseg models NAME`") from exc
    found = sorted((local / "artifacts").glob("weights.pt")) + sorted((local / "artifacts").glob("*.ckpt"))
    if not found:
        raise CheckpointError(f"model.finetune_from={uri} holds no fcnseg PyTorch weights (artifacts/weights.pt); "
                              f"an exported ONNX model cannot be fine-tuned: give its PyTorch model or checkpoint")
    return found[0]


def source_normalization(path: Path) -> str:
    """The input normalisation a weights file expects: recorded in an fcnseg checkpoint; a pytorch-fcn ``.pth``
    (the Caffe-converted nets and that project's training) expects Caffe input."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    return str(hparams.get("normalization", "imagenet")) if isinstance(hparams, dict) else "caffe"


def finetune_from(net: nn.Module, source: str, normalization: str, tracking_uri: str | None = None) -> list[str]:
    """Initialises ``net`` (built for the new dataset's classes) from ``source``: backbone kept, score layers
    re-initialised. Refuses weights that expect another input normalisation than ``normalization``."""
    with tempfile.TemporaryDirectory(prefix="fcnseg-finetune-") as tmp:
        path = _model_weights(source, tracking_uri, Path(tmp)) if source.startswith(MODEL_URI_PREFIXES) \
            else Path(source)
        if not path.is_file():
            raise CheckpointError(f"model.finetune_from={source} does not exist; pass an fcnseg .ckpt (fcnseg "
                                  f"import-weights writes one), a pytorch-fcn .pth or models:/NAME@ALIAS")
        try:
            expected = source_normalization(path)
        except Exception as exc:
            raise CheckpointError(f"cannot read model.finetune_from={source}: {one_line(exc)}") from exc
        if expected != normalization:
            raise ConfigError(f"model.finetune_from={source} was trained on {expected}-normalised input, but "
                              f"model.normalization={normalization}; set model.normalization={expected}")
        return load_for_finetuning(net, path)
