"""PASCAL VOC class names, the void label and the VOC colour palette."""

from collections.abc import Sequence

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)
IGNORE_INDEX = 255  # VOC "void": object boundaries and difficult regions; never counted by loss or metrics


def class_names_for(num_classes: int, names: Sequence[str] | None = None) -> list[str]:
    """The names of ``num_classes`` classes: ``names`` when the data config, checkpoint or model gives them, else
    the first ``num_classes`` VOC names (``class_<i>`` past VOC's 21). The one fallback to VOC's names."""
    if names:
        return list(names)
    return [VOC_CLASSES[i] if i < len(VOC_CLASSES) else f"class_{i}" for i in range(num_classes)]


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The VOC colour map (bit-interleaved class index → RGB), shape ``(num_colors, 3)`` uint8.

    Index 255 (void) maps to (224, 224, 192), as in the VOC devkit's ``labelcolormap``.
    """
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette
