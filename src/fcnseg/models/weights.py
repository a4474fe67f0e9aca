"""Getting weights into an FCN: VGG16 backbones, the pytorch-fcn reference nets, coarser FCNs (staged training) and
trained FCNs of other datasets (fine-tuning to new classes).

All files are read with ``torch.load(weights_only=True)``: a checkpoint can never run code. Every failure a user
can cause (missing file, corrupt file, wrong kind of checkpoint, wrong key or shape) is a one-line
``CheckpointError`` naming the file and the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fcnseg.errors import CheckpointError, one_line

StateDictSource = str | os.PathLike | Mapping[str, torch.Tensor]
NET_PREFIX = "net."  # where an fcnseg checkpoint (see fcnseg.models.checkpoint) holds the net's tensors

# torchvision's vgg16().features indices of the 13 convolutions, with their names in the paper's nets.
_TORCHVISION_VGG16_CONVS: dict[int, str] = {
    0: "conv1_1", 2: "conv1_2",
    5: "conv2_1", 7: "conv2_2",
    10: "conv3_1", 12: "conv3_2", 14: "conv3_3",
    17: "conv4_1", 19: "conv4_2", 21: "conv4_3",
    24: "conv5_1", 26: "conv5_2", 28: "conv5_3",
}  # fmt: skip
# torchvision's vgg16().classifier indices of the two hidden Linear layers, which become convolutions.
_TORCHVISION_VGG16_FCS: dict[int, str] = {0: "fc6", 3: "fc7"}


def _load_file(path: str | os.PathLike) -> object:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(
            f"cannot read weights file {path} ({one_line(exc)}); it must be a PyTorch state dict or checkpoint "
            "saved with torch.save holding only tensors and plain Python containers"
        ) from exc


def _strip_prefix(state: Mapping[str, object], prefix: str) -> dict[str, object]:
    """Drop ``prefix`` from keys that have it; keys without it are dropped when any key has it."""
    if not any(key.startswith(prefix) for key in state):
        return dict(state)
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def read_state_dict(source: StateDictSource) -> tuple[dict[str, torch.Tensor], str]:
    """A flat ``{name: tensor}`` state dict and a description of where it came from, for error messages.

    ``source`` is a path or a mapping: a raw state dict, a pytorch-fcn training checkpoint (``model_state_dict``),
    or a Lightning checkpoint (``state_dict`` with keys prefixed ``net.``). A ``torch.compile`` prefix
    (``_orig_mod.``) is removed too.
    """
    where = "the given state dict"
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        source = _load_file(source)  # type: ignore[assignment]
    if not isinstance(source, Mapping):
        raise CheckpointError(f"{where} holds a {type(source).__name__}, not a state dict; pass a state dict file")
    if isinstance(source.get("state_dict"), Mapping):  # Lightning checkpoint
        source = _strip_prefix(source["state_dict"], NET_PREFIX)
    elif isinstance(source.get("model_state_dict"), Mapping):  # pytorch-fcn training checkpoint
        source = source["model_state_dict"]
    state = _strip_prefix(source, "_orig_mod.")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{where} holds no tensors; pass a state dict or a checkpoint with one")
    return tensors, where


def _copy(target: torch.Tensor, source: torch.Tensor) -> None:
    with torch.no_grad():
        target.copy_(source.reshape(target.shape))


def load_vgg16_backbone(model: nn.Module, source: StateDictSource) -> None:
    """Copy VGG16 weights (torchvision layout) into the FCN's conv1_1..conv5_3, fc6 and fc7.

    ``source``: ``"imagenet"`` for torchvision's ``VGG16_Weights.IMAGENET1K_V1`` (downloaded once into the torch
    hub cache), or a path to / mapping of a torchvision ``vgg16`` state dict. The classifier's first two Linear
    layers become fc6 (4096x25088 -> 4096x512x7x7) and fc7 (4096x4096 -> 4096x4096x1x1).
    """
    if isinstance(source, str) and source == "imagenet":
        state, where = _download_imagenet_vgg16(), "torchvision VGG16_Weights.IMAGENET1K_V1"
    else:
        state, where = read_state_dict(source)

    pairs = [(f"features.{i}", name) for i, name in _TORCHVISION_VGG16_CONVS.items()]
    pairs += [(f"classifier.{i}", name) for i, name in _TORCHVISION_VGG16_FCS.items()]
    for src_prefix, name in pairs:
        layer = getattr(model, name)
        for param in ("weight", "bias"):
            key, target = f"{src_prefix}.{param}", getattr(layer, param)
            if key not in state:
                raise CheckpointError(
                    f"{where} is not a torchvision VGG16 state dict: key {key!r} is missing; "
                    "pass the state dict of torchvision.models.vgg16 (not vgg16_bn)"
                )
            if state[key].numel() != target.numel():
                raise CheckpointError(
                    f"{where}: {key!r} has shape {tuple(state[key].shape)}, but {name}.{param} needs "
                    f"{tuple(target.shape)}; pass a torchvision VGG16 state dict"
                )
            _copy(target, state[key])


def _download_imagenet_vgg16() -> dict[str, torch.Tensor]:
    from torchvision.models import VGG16_Weights

    try:
        return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # no network, proxy, bad cache file, hash mismatch, ...
        raise CheckpointError(
            f"cannot get torchvision's VGG16 ImageNet weights ({one_line(exc)}); download "
            f"{VGG16_Weights.IMAGENET1K_V1.url} elsewhere and pass its local path as backbone_weights "
            "(model.net.backbone_weights=/path/to/vgg16.pth)"
        ) from exc


def load_reference_weights(model: nn.Module, state_dict_or_path: StateDictSource) -> nn.Module:
    """Load a wkentaro/pytorch-fcn checkpoint (e.g. the Caffe-converted VOC FCNs) into a matching FCN.

    Accepts a raw state dict or that project's training checkpoint (``{"model_state_dict": ...}``). Every key and
    shape must match: a checkpoint of another variant (FCN-16s into FCN-8s) or class count is refused. Note that
    Caffe-converted weights expect Caffe input (BGR, 0-255, mean-subtracted). Returns ``model``.
    """
    state, where = read_state_dict(state_dict_or_path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    if missing:
        raise CheckpointError(
            f"{where} lacks key {missing[0]!r} ({len(missing)} missing); "
            "pass a checkpoint of the same FCN variant (fcn32s/fcn16s/fcn8s)"
        )
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise CheckpointError(
            f"{where} has unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected); "
            "pass a checkpoint of the same FCN variant (fcn32s/fcn16s/fcn8s)"
        )
    for key, target in expected.items():
        if state[key].shape != target.shape:
            raise CheckpointError(
                f"{where}: {key!r} has shape {tuple(state[key].shape)}, the model needs {tuple(target.shape)}; "
                "build the model with the checkpoint's num_classes and width=1"
            )
    model.load_state_dict(state)
    return model


def init_from_coarser(model: nn.Module, checkpoint_or_state_dict: StateDictSource) -> list[str]:
    """Staged training (the paper): initialise FCN-16s from a trained FCN-32s, FCN-8s from FCN-16s.

    Copies every parameter whose name and shape match (VGG, fc6, fc7, score_fr, score_pool4, shared upsamplers);
    the layers the coarser net lacks keep their initialisation (zero skip scores, bilinear upsampling), so the
    finer net starts out predicting what the coarser one did. Accepts a state dict, a pytorch-fcn checkpoint or a
    Lightning checkpoint (keys ``net.*``). Returns the copied keys.
    """
    state, where = read_state_dict(checkpoint_or_state_dict)
    copied = []
    for key, target in model.state_dict().items():
        if key in state and state[key].shape == target.shape:
            _copy(target, state[key])
            copied.append(key)
    if not any(key.startswith("conv1_1.") for key in copied):
        raise CheckpointError(
            f"{where} shares no FCN weights with this model (conv1_1 missing or of another shape); "
            "pass a checkpoint of a coarser FCN trained with the same width"
        )
    return copied


CLASS_LAYER_PREFIXES = ("score_", "upscore")  # score layers and upsampling: sized by the class count


def load_for_finetuning(model: nn.Module, checkpoint_or_state_dict: StateDictSource) -> list[str]:
    """Fine-tuning a trained FCN (e.g. the published VOC nets) to another dataset's classes: the backbone and fc
    layers (``conv1_1`` … ``fc7``) are copied from the source, of any variant and class count; the score layers
    (``score_fr``, ``score_pool4``, ``score_pool3``) start again at zero and the upsampling deconvolutions at
    bilinear (:meth:`~fcnseg.models.fcn._FCNBase.reset_classifier`), also when the class counts happen to match.
    Returns the copied keys; a source lacking a backbone tensor, or of another width, is a CheckpointError."""
    state, where = read_state_dict(checkpoint_or_state_dict)
    copied = []
    for key, target in model.state_dict().items():
        if key.startswith(CLASS_LAYER_PREFIXES):
            continue
        if key not in state:
            raise CheckpointError(f"{where} lacks the backbone tensor {key!r}; fine-tune from an FCN checkpoint, a "
                                  f"pytorch-fcn .pth or a registered fcnseg model")
        if state[key].shape != target.shape:
            raise CheckpointError(f"{where}: {key!r} has shape {tuple(state[key].shape)}, this model needs "
                                  f"{tuple(target.shape)}; set model.net.width to the width the source was "
                                  f"trained with (1.0 for the published nets)")
        _copy(target, state[key])
        copied.append(key)
    model.reset_classifier()
    return copied
