"""Test-time augmentation with PyTorch: the image at several scales (and mirrored), softmax probabilities resized
back to the image and averaged, as MMSegmentation's multi-scale + flip test does.

A flip and its image share a batch. On CUDA the scales share one batch too: each input is zero-padded (zero is the
mean colour after normalisation, as the net's own 100-px padding) at its bottom and right to the largest scale, and
its scores are cropped back; on CPU, where a batch saves nothing, each scale is its own pass.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fcnseg.data.transforms import normalize_image
from fcnseg.errors import ConfigError
from fcnseg.tta_spec import TTASpec


def as_tta(tta) -> TTASpec | None:
    """A TTASpec from one, from a config mapping (``scales``, ``flip``: the conf/tta group), or from a
    conf/tta preset name (``none``, ``flip``, ``mmseg``); None stays None."""
    if tta is None or isinstance(tta, TTASpec):
        return tta
    if isinstance(tta, str):
        from pathlib import Path

        import yaml

        from fcnseg.config import CONFIG_DIR

        path = Path(CONFIG_DIR) / "tta" / f"{tta}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ConfigError(f"--tta {tta}: no such setting; choose one of {', '.join(known)} (conf/tta/)")
        tta = yaml.safe_load(path.read_text())
    return TTASpec.make(tta.get("scales", (1.0,)), tta.get("flip", False))


def _passes(x: torch.Tensor, spec: TTASpec) -> list[torch.Tensor]:
    height, width = x.shape[-2:]
    inputs = []
    for scale in spec.scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = x if size == (height, width) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        inputs.append(torch.cat([scaled, scaled.flip(-1)]) if spec.flip else scaled)
    return inputs


@torch.inference_mode()
def tta_probabilities(segmenter, image: np.ndarray, spec: TTASpec, batch_scales: bool | None = None) -> torch.Tensor:
    """(C, H, W) mean softmax probabilities of ``image`` over ``spec``'s passes, on the segmenter's device.
    ``batch_scales`` (default: on CUDA) puts all scales in one padded batch (see the module docstring)."""
    x = normalize_image(image, segmenter.normalization)[None]
    height, width = x.shape[-2:]
    inputs = _passes(x, spec)
    if segmenter.device.type == "cuda" if batch_scales is None else batch_scales:
        top, left = max(i.shape[-2] for i in inputs), max(i.shape[-1] for i in inputs)
        scores = segmenter.forward(torch.cat([F.pad(i, (0, left - i.shape[-1], 0, top - i.shape[-2]))
                                              for i in inputs]))
        outputs = [s[..., : i.shape[-2], : i.shape[-1]]
                   for s, i in zip(scores.split([len(i) for i in inputs]), inputs)]
    else:
        outputs = [segmenter.forward(i) for i in inputs]
    total = None
    for out in outputs:
        probs = out.float().softmax(1)
        if probs.shape[-2:] != (height, width):
            probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
        probs = probs[0] + probs[1].flip(-1) if spec.flip else probs[0]
        total = probs if total is None else total + probs
    return total / spec.passes
