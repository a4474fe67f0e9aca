"""The MLflow pyfunc model: base64 image in, VOC label map (palette PNG, base64) and per-class pixel counts out.

Served as it is by ``mlflow models serve -m models:/fcn-voc@champion --env-manager local``; its request is
``{"dataframe_records": [{"image": "<base64 PNG or JPEG>"}]}``.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from fcnseg.errors import FcnsegError

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([
        ColSpec("string", "mask"),
        ColSpec("long", "height"),
        ColSpec("long", "width"),
        ColSpec("string", "class_pixels"),
    ]),
)


def encode_image(image: np.ndarray | Image.Image, format: str = "PNG") -> str:
    """An image as a base64 string, the pyfunc's input format."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_label_map(mask_b64: str) -> np.ndarray:
    """The label map (HxW uint8 class indices) from the pyfunc's ``mask`` column."""
    return np.array(Image.open(io.BytesIO(base64.b64decode(mask_b64))))


class FCNSegmenter(mlflow.pyfunc.PythonModel):
    """Loads the fcnseg checkpoint logged with the model and segments whole images of any size."""

    def load_context(self, context) -> None:
        from fcnseg.inference import Segmenter

        self.segmenter = Segmenter.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from fcnseg.inference import read_image_bytes
        from fcnseg.viz import save_label_png

        rows = []
        for index, encoded in enumerate(model_input["image"]):
            try:
                image = read_image_bytes(base64.b64decode(encoded), name=f"row {index}")
            except (ValueError, TypeError) as exc:
                raise FcnsegError(f"row {index}: 'image' is not base64-encoded image data ({exc})") from exc
            label_map = self.segmenter.predict(image)
            buffer = io.BytesIO()
            save_label_png(label_map, buffer)
            counts = np.bincount(label_map.ravel(), minlength=len(self.segmenter.class_names))
            class_pixels = {name: int(c) for name, c in zip(self.segmenter.class_names, counts) if c}
            rows.append({
                "mask": base64.b64encode(buffer.getvalue()).decode("ascii"),
                "height": label_map.shape[0],
                "width": label_map.shape[1],
                "class_pixels": json.dumps(class_pixels),
            })
        return pd.DataFrame(rows, columns=["mask", "height", "width", "class_pixels"])


def log_pyfunc_model(checkpoint_path: str | Path, example_images: list[np.ndarray], name: str = "model") -> str:
    """Logs the checkpoint as an MLflow pyfunc model in the active run; returns its model URI."""
    input_example = pd.DataFrame({"image": [encode_image(image) for image in example_images]})
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=FCNSegmenter(),
        artifacts={"checkpoint": str(checkpoint_path)},
        signature=SIGNATURE,
        input_example=input_example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "fcnseg"],
    )
    return info.model_uri
