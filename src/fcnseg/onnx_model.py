"""The ONNX model as an MLflow pyfunc on onnxruntime, torch-free: what ``fcnseg export --register`` logs.

It answers the PyTorch pyfunc's schema (:data:`fcnseg.serving_io.SIGNATURE`, one row per image, the same limits and
error answers) and needs only onnxruntime, numpy and pillow (plus MLflow, which loads it). Its artifacts: the
``.onnx`` net (dynamic batch, height and width) and ``metadata.json`` (class names, palette, input normalisation,
the net's first conv width for the memory estimate, the parity measured at export).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np

from fcnseg.serving_guard import install as install_guard
from fcnseg.serving_io import ForwardCost, Limits, answer_rows


def normalize(image: np.ndarray, normalization: dict) -> np.ndarray:
    """HxWx3 uint8 RGB as a 1x3xHxW float32 input, as ``fcnseg.data.transforms.normalize_image`` does
    (albumentations' Normalize: ``(pixel - mean * max) / (std * max)``, channels reversed first for BGR nets)."""
    pixels = image[..., ::-1] if normalization["bgr"] else image
    scale = float(normalization["max_pixel_value"])
    mean = np.asarray(normalization["mean"], np.float32) * scale
    std = np.asarray(normalization["std"], np.float32) * scale
    return ((pixels.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None].copy()


class OnnxSegmenter:
    """An exported FCN on onnxruntime: label maps for RGB uint8 images of any size."""

    def __init__(self, onnx_path: str | Path, metadata: dict, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.metadata = metadata
        self.class_names = list(metadata["class_names"])
        self.palette = np.asarray(metadata["palette"], np.uint8)
        self.input_name = self.session.get_inputs()[0].name

    def scores(self, images: list[np.ndarray]) -> np.ndarray:
        """Class scores (N, C, H, W) float32 for RGB uint8 images of one size."""
        batch = np.concatenate([normalize(image, self.metadata["normalization"]) for image in images])
        return self.session.run(None, {self.input_name: batch})[0]

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.scores([image])[0].argmax(0).astype(np.uint8)

    def cost(self) -> ForwardCost:
        return ForwardCost(int(self.metadata["first_channels"]), len(self.class_names))


class OnnxPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the exported net and its metadata; answers as :class:`fcnseg.serving.FCNSegmenter` does."""

    def load_context(self, context) -> None:
        self.limits = Limits.from_env()
        install_guard(self.limits.max_request_bytes)
        metadata = json.loads(Path(context.artifacts["metadata"]).read_text())
        self.segmenter = OnnxSegmenter(context.artifacts["onnx"], metadata)

    def predict(self, context, model_input, params=None):
        segmenter = self.segmenter
        return answer_rows(model_input["image"], segmenter.predict, segmenter.class_names, segmenter.cost(),
                           self.limits, segmenter.palette)
