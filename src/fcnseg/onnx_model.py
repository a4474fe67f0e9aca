"""The ONNX model as an MLflow pyfunc on onnxruntime, torch-free: what ``fcnseg export --register`` logs.

It answers the PyTorch pyfunc's schema (:data:`fcnseg.serving_io.SIGNATURE`, one row per image, the same limits and
error answers) and needs only onnxruntime, numpy and pillow (plus MLflow, which loads it). Its artifacts: the
``.onnx`` net (dynamic batch, height and width) and ``metadata.json`` (class names, palette, input normalisation,
the net's first conv width for the memory estimate, the parity measured at export).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow.pyfunc
import numpy as np

from fcnseg.errors import DataError
from fcnseg.serving_guard import install as install_guard
from fcnseg.serving_io import ForwardCost, Limits, answer_rows
from fcnseg.tta_spec import TTASpec, tta_from_env


# onnxruntime's CPU arena keeps the memory of the largest pass for reuse: faster passes, but a server then sits at its
# high-water mark (width-1 FCN-8s, one 500x375 pass: +416 MB held with the arena, +25 MB without, for 8% more time).
# The served model runs without it unless this is 1; fcnseg predict/evaluate (one-shot processes) keep it.
MEMORY_ARENA_ENV = "FCNSEG_ONNX_MEMORY_ARENA"


def memory_arena_from_env() -> bool:
    value = os.environ.get(MEMORY_ARENA_ENV, "").strip().lower() or "0"
    if value not in ("0", "1"):
        raise DataError(f"${MEMORY_ARENA_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def normalize(image: np.ndarray, normalization: dict) -> np.ndarray:
    """HxWx3 uint8 RGB as a 1x3xHxW float32 input, as ``fcnseg.data.transforms.normalize_image`` does
    (albumentations' Normalize: ``(pixel - mean * max) / (std * max)``, channels reversed first for BGR nets)."""
    pixels = image[..., ::-1] if normalization["bgr"] else image
    scale = float(normalization["max_pixel_value"])
    mean = np.asarray(normalization["mean"], np.float32) * scale
    std = np.asarray(normalization["std"], np.float32) * scale
    return ((pixels.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None].copy()


def resize_bilinear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) float32 resized to (C, *size) by bilinear interpolation with half-pixel centres and no
    antialiasing: what ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` computes."""

    def axis(out: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.clip((np.arange(out, dtype=np.float32) + 0.5) * (length / out) - 0.5, 0, None)
        low = np.minimum(source.astype(np.int64), length - 1)
        return low, np.minimum(low + 1, length - 1), (source - low).astype(np.float32)

    (top, bottom, dy), (left, right, dx) = axis(size[0], array.shape[-2]), axis(size[1], array.shape[-1])
    rows = array[:, top] * (1 - dy)[None, :, None] + array[:, bottom] * dy[None, :, None]
    return (rows[..., left] * (1 - dx) + rows[..., right] * dx).astype(np.float32)


class OnnxSegmenter:
    """An exported FCN on onnxruntime: label maps for RGB uint8 images of any size."""

    def __init__(self, onnx_path: str | Path, metadata: dict, threads: int | None = None,
                 tta: TTASpec | None = None, memory_arena: bool = True) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.enable_cpu_mem_arena = memory_arena
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.metadata = metadata
        self.class_names = list(metadata["class_names"])
        self.palette = np.asarray(metadata["palette"], np.uint8)
        self.input_name = self.session.get_inputs()[0].name
        self.tta = tta or TTASpec()

    def scores(self, images: list[np.ndarray]) -> np.ndarray:
        """Class scores (N, C, H, W) float32 for RGB uint8 images of one size."""
        batch = np.concatenate([normalize(image, self.metadata["normalization"]) for image in images])
        return self.session.run(None, {self.input_name: batch})[0]

    def predict(self, image: np.ndarray) -> np.ndarray:
        if self.tta.active:
            return self.tta_probabilities(image).argmax(0).astype(np.uint8)
        return self.scores([image])[0].argmax(0).astype(np.uint8)

    def tta_probabilities(self, image: np.ndarray) -> np.ndarray:
        """(C, H, W) mean softmax over :attr:`tta`'s scales and flips, as :func:`fcnseg.tta.tta_probabilities`
        does on CPU (the same bilinear resizing of the normalised input and of the probabilities)."""
        height, width = image.shape[:2]
        x = normalize(image, self.metadata["normalization"])[0]
        total = np.zeros((len(self.class_names), height, width), np.float32)
        for scale in self.tta.scales:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = x if size == (height, width) else resize_bilinear(x, size)
            batch = np.stack([scaled, scaled[..., ::-1]]) if self.tta.flip else scaled[None]
            scores = self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]
            probs = np.exp(scores - scores.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            if size != (height, width):
                probs = np.stack([resize_bilinear(p, (height, width)) for p in probs])
            total += probs[0] + probs[1][..., ::-1] if self.tta.flip else probs[0]
        return total / self.tta.passes

    def cost(self) -> ForwardCost:
        return ForwardCost(int(self.metadata["first_channels"]), len(self.class_names), self.tta.scales)


class OnnxPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the exported net and its metadata; answers as :class:`fcnseg.serving.FCNSegmenter` does."""

    def load_context(self, context) -> None:
        self.limits = Limits.from_env()
        install_guard(self.limits.max_request_bytes)
        metadata = json.loads(Path(context.artifacts["metadata"]).read_text())
        self.segmenter = OnnxSegmenter(context.artifacts["onnx"], metadata, tta=tta_from_env(),
                                       memory_arena=memory_arena_from_env())

    def predict(self, context, model_input, params=None):
        segmenter = self.segmenter
        return answer_rows(model_input["image"], segmenter.predict, segmenter.class_names, segmenter.cost(),
                           self.limits, segmenter.palette)
