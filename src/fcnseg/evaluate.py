"""Evaluation of a trained model on a split of its dataset (any layout: VOC, folder, Cityscapes, ADE20K): the
paper's four metrics, per-class IoU under the dataset's class names, and plots in its colours.

Whole images, one at a time (as the paper evaluates), with plain PyTorch: usable from the DVC ``evaluate`` stage,
``fcnseg evaluate`` and after training, without a Trainer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fcnseg import viz
from fcnseg.data.dataset_spec import DatasetSpec
from fcnseg.errors import DataError
from fcnseg.inference import Segmenter, segmenter_dataset
from fcnseg.metrics import SCALAR_KEYS, SegmentationMetrics


@dataclass
class EvaluationReport:
    results: dict[str, Any]
    class_names: list[str]
    grid: np.ndarray | None = None
    example_images: list[np.ndarray] = field(default_factory=list)
    dataset: DatasetSpec | None = None  # the classes' palette for the plots (None: VOC's)

    def summary(self) -> dict[str, Any]:
        """The JSON written for ``dvc metrics``: the four metrics and per-class IoU (null where undefined)."""
        out: dict[str, Any] = {key: float(self.results[key]) for key in SCALAR_KEYS}
        out["per_class_iou"] = {name: (None if iou != iou else round(iou, 6))
                                for name, iou in zip(self.class_names, self.results["per_class_iou"].tolist())}
        return out


def open_eval_split(segmenter, data_root: str | Path, split: str, data: Mapping[str, Any] | None = None):
    """The split's images and training-id labels: read as ``data`` (a data config) says, else as the model's own
    dataset was (its layout and label mapping), from ``data_root``."""
    from fcnseg.data.layouts import open_split

    return open_split(data if data is not None else segmenter_dataset(segmenter), split, root=str(data_root))


def evaluate_segmenter(segmenter, data_root: str | Path, split: str, num_overlays: int = 0,
                       progress: bool = False, data: Mapping[str, Any] | None = None) -> EvaluationReport:
    """Scores ``segmenter`` on ``split`` of the dataset at ``data_root`` (see :func:`open_eval_split`); refuses
    (DataError) data whose classes are not the model's."""
    dataset = open_eval_split(segmenter, data_root, split, data)
    model_spec = segmenter_dataset(segmenter)
    data_spec = getattr(dataset, "spec", None) or model_spec
    if tuple(data_spec.class_names) != tuple(model_spec.class_names):
        raise DataError(f"the model predicts {model_spec.num_classes} classes ({', '.join(model_spec.class_names[:4])}"
                        f", ...) but {data_root} is dataset {data_spec.name!r} with {data_spec.num_classes} "
                        f"({', '.join(data_spec.class_names[:4])}, ...); evaluate it on its own dataset, or set "
                        f"data.class_names to the model's")
    num_classes = model_spec.num_classes
    # One process scores the whole split: no sync, even when a DDP group exists (rank 0 alone after training)
    metric = SegmentationMetrics(num_classes, ignore_index=data_spec.ignore_index, sync_on_compute=False)
    shown: tuple[list, list, list] = ([], [], [])
    for index in tqdm(range(len(dataset)), desc=f"evaluate {split}", disable=not progress):
        image, mask = dataset[index]
        pred = segmenter.predict(image)
        metric.update(torch.from_numpy(pred)[None].long(), torch.from_numpy(mask)[None].long())
        if index < num_overlays:
            for bucket, item in zip(shown, (image, mask, pred)):
                bucket.append(item)
    grid = viz.prediction_grid(*shown, dataset=model_spec) if shown[0] else None
    return EvaluationReport(metric.compute(), list(model_spec.class_names), grid, shown[0], model_spec)


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path, split: str, num_overlays: int = 0,
                        device: str | None = None, progress: bool = False, tta=None,
                        data: Mapping[str, Any] | None = None) -> EvaluationReport:
    """``tta``: None, a conf/tta mapping (``scales``, ``flip``) or preset name: see :func:`fcnseg.tta.as_tta`.
    ``data``: the data config the split is read with (default: the checkpoint's dataset)."""
    from fcnseg.tta import as_tta

    segmenter = Segmenter.from_checkpoint(checkpoint, device=device)
    segmenter.tta = as_tta(tta)
    return evaluate_segmenter(segmenter, data_root, split, num_overlays, progress, data=data)


def write_reports(report: EvaluationReport, metrics_file: str | Path, plots_dir: str | Path,
                  history: list[dict[str, float]] | None = None) -> None:
    """``metrics.json`` for ``dvc metrics``; per-class IoU, confusion matrix and curves for ``dvc plots``."""
    metrics_file, plots_dir = Path(metrics_file), Path(plots_dir)
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(report.summary(), indent=2))
    iou_rows = [{"class": name, "iou": (0.0 if iou != iou else iou)}
                for name, iou in zip(report.class_names, report.results["per_class_iou"].tolist())]
    (plots_dir / "per_class_iou.json").write_text(json.dumps(iou_rows, indent=2))
    hist = report.results["confusion_matrix"].cpu().numpy()
    confusion_rows = [{"actual": report.class_names[t], "predicted": report.class_names[p], "count": int(hist[t, p])}
                      for t in range(hist.shape[0]) for p in range(hist.shape[1]) if hist[t, p]]
    (plots_dir / "confusion.json").write_text(json.dumps(confusion_rows))
    viz.figure_to_png(viz.plot_confusion_matrix(hist, report.class_names), plots_dir / "confusion_matrix.png")
    palette = report.dataset.palette if report.dataset is not None else None
    viz.figure_to_png(viz.plot_per_class_iou(report.results["per_class_iou"].cpu().numpy(), report.class_names,
                                             palette), plots_dir / "per_class_iou.png")
    if report.grid is not None:
        from PIL import Image

        Image.fromarray(report.grid).save(plots_dir / "predictions.png")
    if history is not None:
        (plots_dir / "history.json").write_text(json.dumps(history, indent=2))


def print_report(report: EvaluationReport) -> None:
    summary = report.summary()
    print("  ".join(f"{key} {summary[key]:.4f}" for key in SCALAR_KEYS))
    width = max(len(name) for name in report.class_names)
    for name, iou in summary["per_class_iou"].items():
        print(f"  {name:<{width}}  {'   n/a' if iou is None else f'{iou:.4f}'}")
