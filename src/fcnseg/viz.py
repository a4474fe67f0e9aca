"""Pictures of segmentations: the dataset's colours, overlays with a legend, prediction grids and metric plots.

Colours, class names and the ignore index come from a :class:`~fcnseg.data.dataset_spec.DatasetSpec` (``dataset``);
without one, VOC's. In overlays every class is tinted except a VOC-style background: class 0 is left as the photo
only when it is named ``background`` (VOC, and folder datasets that follow it); Cityscapes' road or ADE20K's wall
are classes like any other and are tinted.

Plots are built on ``matplotlib.figure.Figure`` directly (no pyplot), so nothing here touches the global backend or
needs a display, and figures are freed when dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fcnseg.data.classes import VOC_CLASSES
from fcnseg.data.dataset_spec import DatasetSpec
from fcnseg.data.voc import VOC_PALETTE, as_label_map

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PALETTE = VOC_PALETTE
LEGEND_FONT_SIZE = 12
LEGEND_ROW = 16  # pixels per legend entry
LEGEND_PAD = 4


def _spec(dataset: DatasetSpec | None, class_names: Sequence[str] | None = None) -> DatasetSpec:
    return dataset if dataset is not None else DatasetSpec.from_metadata(None, class_names=class_names)


def colorize(label_map: np.ndarray, dataset: DatasetSpec | None = None) -> np.ndarray:
    """``(H, W)`` class indices → ``(H, W, 3)`` uint8 RGB in the dataset's colours (VOC's by default; the ignore
    index, VOC's void 255, → (224, 224, 192))."""
    return _spec(dataset).png_palette()[as_label_map(label_map)]


def untinted_class(dataset: DatasetSpec) -> int | None:
    """The class overlays leave as the photo: 0 when it is a VOC-style ``background``, else none."""
    return 0 if dataset.class_names and dataset.class_names[0].lower() == "background" else None


def _class_name(index: int, dataset: DatasetSpec) -> str:
    if index == dataset.ignore_index:
        return "void"
    return dataset.class_names[index] if index < dataset.num_classes else f"class {index}"


def _draw_legend(labels: Sequence[int], dataset: DatasetSpec) -> Image.Image:
    font = ImageFont.load_default(LEGEND_FONT_SIZE)
    names = [_class_name(i, dataset) for i in labels]
    palette = dataset.png_palette()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(measure.textlength(name, font=font)) for name in names)
    width = LEGEND_PAD * 3 + LEGEND_ROW + text_width
    height = LEGEND_PAD * 2 + LEGEND_ROW * len(labels)
    legend = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(legend)
    for row, (index, name) in enumerate(zip(labels, names)):
        top = LEGEND_PAD + row * LEGEND_ROW
        swatch = (LEGEND_PAD, top + 2, LEGEND_PAD + LEGEND_ROW - 4, top + LEGEND_ROW - 2)
        draw.rectangle(swatch, fill=tuple(int(c) for c in palette[index]), outline="black")
        draw.text((LEGEND_PAD * 2 + LEGEND_ROW, top + LEGEND_ROW // 2), name, fill="black", font=font, anchor="lm")
    return legend


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.5, class_names: Sequence[str] = VOC_CLASSES,
            legend: bool = True, dataset: DatasetSpec | None = None) -> np.ndarray:
    """The image with the classes' colours blended in, and a legend of the classes present to its right.

    ``dataset`` gives names and colours (default: ``class_names`` with VOC's palette for VOC's names). A VOC-style
    background (class 0 named ``background``) is left unblended so the photo stays readable; every other class is
    tinted. The image occupies the top-left ``H × W`` of the result, unchanged in size; the legend widens the
    canvas (and heightens it if it has more rows than fit). Returns uint8 RGB.
    """
    dataset = _spec(dataset, class_names)
    image = np.asarray(image)
    labels = as_label_map(label_map)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and label map {labels.shape} differ in size")
    colours = dataset.png_palette()[labels].astype(np.float32)
    blended = image.astype(np.float32)
    background = untinted_class(dataset)
    mask = labels != background if background is not None else np.ones(labels.shape, bool)
    blended[mask] = (1 - alpha) * blended[mask] + alpha * colours[mask]
    result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    present = [int(i) for i in np.unique(labels)]
    if not legend or not present:
        return result
    key = _draw_legend(present, dataset)
    height, width = labels.shape
    canvas = Image.new("RGB", (width + key.width, max(height, key.height)), "white")
    canvas.paste(Image.fromarray(result), (0, 0))
    canvas.paste(key, (width, 0))
    return np.asarray(canvas)


def prediction_grid(images: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                    preds: Sequence[np.ndarray], dataset: DatasetSpec | None = None) -> np.ndarray:
    """One row per sample: image | ground truth | prediction (the dataset's colours); rows padded white to the
    widest."""
    if not images or not len(images) == len(targets) == len(preds):
        raise ValueError(f"need the same, non-zero number of images, targets and predictions, "
                         f"got {len(images)}, {len(targets)}, {len(preds)}")
    rows = [np.concatenate([np.asarray(image, dtype=np.uint8), colorize(target, dataset), colorize(pred, dataset)],
                           axis=1)
            for image, target, pred in zip(images, targets, preds)]
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    return np.concatenate(padded, axis=0)


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_confusion_matrix(hist: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Row-normalised confusion matrix (each true class sums to 1; classes never seen stay 0)."""
    hist = np.asarray(hist, dtype=np.float64)
    rows = hist.sum(axis=1, keepdims=True)
    normalised = np.divide(hist, rows, out=np.zeros_like(hist), where=rows > 0)
    size = min(max(4.0, 0.35 * len(class_names) + 2), 20.0)  # 150 classes (ADE20K): 20 in, small labels
    fontsize = max(2.5, min(10.0, 10.0 * 30 / max(len(class_names), 1)))
    fig = _new_figure(size + 1, size)
    ax = fig.add_subplot()
    shown = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=list(class_names), rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels=list(class_names), fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (rows normalised)")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    return fig


def plot_per_class_iou(iou: np.ndarray, class_names: Sequence[str], palette: np.ndarray | None = None) -> Figure:
    """Horizontal bars of per-class IoU in the classes' colours (``palette``: the dataset's, default VOC's);
    classes with no IoU (nan: absent from truth and prediction) say so."""
    iou = np.asarray(iou, dtype=np.float64)
    colours = (_spec(None, class_names).palette if palette is None else np.asarray(palette))[: len(class_names)]
    fig = _new_figure(6.0, min(max(3.0, 0.3 * len(class_names) + 1), 30.0))
    ax = fig.add_subplot()
    positions = np.arange(len(class_names))
    ax.barh(positions, np.nan_to_num(iou, nan=0.0), color=colours / 255.0, edgecolor="black")
    for position, value in zip(positions, iou):
        ax.text(0.01 if np.isnan(value) else value + 0.01, position, "absent" if np.isnan(value) else f"{value:.2f}",
                va="center", fontsize=8, color="grey" if np.isnan(value) else "black")
    if not np.all(np.isnan(iou)):
        mean = float(np.nanmean(iou))
        ax.axvline(mean, color="red", linestyle="--", label=f"mean IoU {mean:.3f}")
        ax.legend(loc="lower right")
    ax.set_yticks(positions, labels=list(class_names))
    ax.invert_yaxis()  # first class on top, as in the class list
    ax.set_xlim(0.0, 1.1)
    ax.set_xlabel("IoU")
    ax.set_title("per-class IoU")
    return fig


def figure_to_png(fig: Figure, path: str | Path) -> Path:
    """Saves ``fig`` as PNG (creating the folder), then releases it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # a pyplot-made figure stays registered until closed
        pyplot.close(fig)
    return path

