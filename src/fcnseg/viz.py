"""Pictures of segmentations: VOC colours, overlays with a legend, prediction grids and metric plots.

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

from fcnseg.data.classes import IGNORE_INDEX, VOC_CLASSES
from fcnseg.data.voc import VOC_PALETTE, as_label_map

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PALETTE = VOC_PALETTE
LEGEND_FONT_SIZE = 12
LEGEND_ROW = 16  # pixels per legend entry
LEGEND_PAD = 4


def colorize(label_map: np.ndarray) -> np.ndarray:
    """``(H, W)`` class indices → ``(H, W, 3)`` uint8 RGB in the VOC colours (void 255 → (224, 224, 192))."""
    return PALETTE[as_label_map(label_map)]


def _class_name(index: int, class_names: Sequence[str]) -> str:
    if index == IGNORE_INDEX:
        return "void"
    return class_names[index] if index < len(class_names) else f"class {index}"


def _draw_legend(labels: Sequence[int], class_names: Sequence[str]) -> Image.Image:
    font = ImageFont.load_default(LEGEND_FONT_SIZE)
    names = [_class_name(i, class_names) for i in labels]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(measure.textlength(name, font=font)) for name in names)
    width = LEGEND_PAD * 3 + LEGEND_ROW + text_width
    height = LEGEND_PAD * 2 + LEGEND_ROW * len(labels)
    legend = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(legend)
    for row, (index, name) in enumerate(zip(labels, names)):
        top = LEGEND_PAD + row * LEGEND_ROW
        swatch = (LEGEND_PAD, top + 2, LEGEND_PAD + LEGEND_ROW - 4, top + LEGEND_ROW - 2)
        draw.rectangle(swatch, fill=tuple(int(c) for c in PALETTE[index]), outline="black")
        draw.text((LEGEND_PAD * 2 + LEGEND_ROW, top + LEGEND_ROW // 2), name, fill="black", font=font, anchor="lm")
    return legend


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.5, class_names: Sequence[str] = VOC_CLASSES,
            legend: bool = True) -> np.ndarray:
    """The image with the classes' colours blended in, and a legend of the classes present to its right.

    Background (0) is left unblended so the photo stays readable. The image occupies the top-left ``H × W`` of the
    result, unchanged in size; the legend widens the canvas (and heightens it if it has more rows than fit).
    Returns uint8 RGB.
    """
    image = np.asarray(image)
    labels = as_label_map(label_map)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and label map {labels.shape} differ in size")
    colours = PALETTE[labels].astype(np.float32)
    blended = image.astype(np.float32)
    mask = labels != 0
    blended[mask] = (1 - alpha) * blended[mask] + alpha * colours[mask]
    result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    present = [int(i) for i in np.unique(labels)]
    if not legend or not present:
        return result
    key = _draw_legend(present, class_names)
    height, width = labels.shape
    canvas = Image.new("RGB", (width + key.width, max(height, key.height)), "white")
    canvas.paste(Image.fromarray(result), (0, 0))
    canvas.paste(key, (width, 0))
    return np.asarray(canvas)


def prediction_grid(images: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                    preds: Sequence[np.ndarray]) -> np.ndarray:
    """One row per sample: image | ground truth | prediction (VOC colours); rows padded white to the widest."""
    if not images or not len(images) == len(targets) == len(preds):
        raise ValueError(f"need the same, non-zero number of images, targets and predictions, "
                         f"got {len(images)}, {len(targets)}, {len(preds)}")
    rows = [np.concatenate([np.asarray(image, dtype=np.uint8), colorize(target), colorize(pred)], axis=1)
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
    size = max(4.0, 0.35 * len(class_names) + 2)
    fig = _new_figure(size + 1, size)
    ax = fig.add_subplot()
    shown = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=list(class_names), rotation=90)
    ax.set_yticks(ticks, labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (rows normalised)")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    return fig


def plot_per_class_iou(iou: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Horizontal bars of per-class IoU; classes with no IoU (nan: absent from truth and prediction) say so."""
    iou = np.asarray(iou, dtype=np.float64)
    fig = _new_figure(6.0, max(3.0, 0.3 * len(class_names) + 1))
    ax = fig.add_subplot()
    positions = np.arange(len(class_names))
    ax.barh(positions, np.nan_to_num(iou, nan=0.0), color=PALETTE[: len(class_names)] / 255.0, edgecolor="black")
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

