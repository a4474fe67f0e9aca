"""The FCN paper's segmentation metrics, all derived from one confusion matrix ``hist[true, pred]``.

pixel acc = Σ diag / Σ hist · mean acc = nanmean(diag / row sums) · IoU_c = diag / (row + col − diag) ·
mean IoU = nanmean(IoU) · f.w. IoU = Σ_c freq_c · IoU_c with freq = row sums / Σ hist.

The matrix is accumulated over the whole split (not averaged per image) and, under DDP, summed across ranks by
torchmetrics when ``compute()`` is called.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from fcnseg.data.classes import IGNORE_INDEX

SCALAR_KEYS: tuple[str, ...] = ("pixel_acc", "mean_acc", "mean_iou", "fw_iou")
_NOT_IN_METRIC_KEYS = re.compile(r"[^A-Za-z0-9_. -]")  # what MLflow (and Lightning's MLflow logger) accepts, less "/"


def metric_keys(class_names: Sequence[str]) -> list[str]:
    """One metric-name part per class (``val/iou/<key>``): the class name with characters MLflow refuses (and
    ``/``, which would nest the name) replaced by ``_``; a key two names would share gets the class index appended,
    so every class keeps a metric of its own."""
    keys = [_NOT_IN_METRIC_KEYS.sub("_", str(name)).strip() or f"class_{i}" for i, name in enumerate(class_names)]
    keys = [key if key.strip(".") else f"class_{i}" for i, key in enumerate(keys)]  # "." / ".." are paths to MLflow
    seen: dict[str, int] = {}
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
    return [f"{key}_{i}" if seen[key] > 1 else key for i, key in enumerate(keys)]


def metrics_from_confusion(hist: Tensor) -> dict[str, Tensor]:
    """The paper's four metrics plus per-class IoU and accuracy from a ``(C, C)`` matrix ``hist[true, pred]``.

    Scalars are 0-dim float64 tensors (``float()`` them, or log them directly with Lightning). Per-class values
    are nan where undefined: IoU for a class absent from both truth and prediction, accuracy for a class absent
    from the truth. nan entries are left out of the means.
    """
    hist = hist.to(torch.float64)
    diag = hist.diagonal()
    rows = hist.sum(dim=1)  # pixels of each true class
    cols = hist.sum(dim=0)  # pixels predicted as each class
    total = hist.sum()
    # 0/0 gives nan, which is exactly "undefined" for the per-class values.
    per_class_acc = diag / rows
    per_class_iou = diag / (rows + cols - diag)
    freq = rows / total
    present = ~per_class_iou.isnan()
    return {
        "pixel_acc": diag.sum() / total,
        "mean_acc": per_class_acc.nanmean(),
        "mean_iou": per_class_iou.nanmean(),
        # An empty matrix has no defined metrics: nan, like the other three, rather than a misleading 0.
        "fw_iou": (freq[present] * per_class_iou[present]).sum() if total > 0 else total / total,
        "per_class_iou": per_class_iou.float(),
        "per_class_acc": per_class_acc.float(),
        "confusion_matrix": hist.to(torch.int64),
    }


def confusion_matrix(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(C, C)`` int64 ``hist[true, pred]`` of label maps; void pixels and labels outside ``[0, C)`` are dropped."""
    target = target.reshape(-1).long()
    preds = preds.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    keep &= (preds >= 0) & (preds < num_classes)
    index = target[keep] * num_classes + preds[keep]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


class SegmentationMetrics(Metric):
    """Accumulates a confusion matrix over batches (and ranks) and returns the paper's metrics.

    ``update(preds, target)``: ``preds`` are scores ``(N, C, H, W)`` (argmax over classes is taken) or labels
    ``(N, H, W)``; ``target`` is ``(N, H, W)`` with ``ignore_index`` for void.
    ``compute()`` returns :func:`metrics_from_confusion`'s dict (scalars as 0-dim tensors, so Lightning can log them).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    confusion_matrix: Tensor

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confusion_matrix", default=torch.zeros(num_classes, num_classes, dtype=torch.int64),
                       dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.is_floating_point():
            if preds.ndim != target.ndim + 1 or preds.shape[1] != self.num_classes:
                raise ValueError(f"scores must be (N, {self.num_classes}, H, W) for targets {tuple(target.shape)}, "
                                 f"got {tuple(preds.shape)}")
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(f"predicted labels {tuple(preds.shape)} and targets {tuple(target.shape)} differ in shape")
        self.confusion_matrix += confusion_matrix(preds, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Tensor]:
        return metrics_from_confusion(self.confusion_matrix)
