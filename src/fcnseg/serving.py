"""The MLflow pyfunc model: base64 image in, label map (palette PNG in the dataset's colours, base64) and per-class
pixel counts (by the dataset's class names) out.

The logged model is self-contained: it carries the few fcnseg modules inference needs (MLflow ``code_paths``:
``code/fcnseg/…``, put on ``sys.path`` by ``mlflow.pyfunc.load_model``), a weights-only checkpoint (the net's
``state_dict``, its hyperparameters, normalisation and class names; no optimiser state) and requirements that all
install from PyPI, pinned to the versions it was logged with (never ``fcnseg``). So it loads where this checkout
is absent: ``mlflow models serve -m models:/fcn-voc@champion`` (MLflow builds the environment) or a Docker image
from ``mlflow models build-docker``. Its request is ``{"dataframe_records": [{"image": "<base64 PNG or JPEG>"}]}``;
its answer one row per image (``mask``, ``height``, ``width``, ``class_pixels``, ``error``: see
:mod:`fcnseg.serving_io`, shared with the ONNX model of :mod:`fcnseg.export`).
"""

from __future__ import annotations

import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, packages_distributions
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from fcnseg.inference import Segmenter
from fcnseg.models.checkpoint import atomic_torch_save, dataset_of, read_checkpoint, weights_only
from fcnseg.serving_guard import install as install_guard
from fcnseg.serving_io import (SIGNATURE, ForwardCost, Limits, answer_rows, decode_label_map,  # noqa: F401
                               encode_image)
from fcnseg.tta_spec import tta_from_env


class FCNSegmenter(mlflow.pyfunc.PythonModel):
    """Loads the fcnseg checkpoint logged with the model and segments whole images of any size; one answer row per
    image (:func:`fcnseg.serving_io.answer_rows`), behind :mod:`fcnseg.serving_guard` when served."""

    def load_context(self, context) -> None:
        self.limits = Limits.from_env()
        install_guard(self.limits.max_request_bytes)
        # "checkpoint": models logged before the weights-only format (a whole training checkpoint)
        self.segmenter = Segmenter.from_checkpoint(context.artifacts.get("weights") or context.artifacts["checkpoint"])
        self.segmenter.tta = tta_from_env()  # $FCNSEG_TTA: none (default), flip, mmseg or "0.5,1,1.5+flip"

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        segmenter = self.segmenter
        tta = getattr(segmenter, "tta", None)
        cost = ForwardCost(segmenter.net.conv1_1.out_channels, len(segmenter.class_names),
                           tta.scales if tta is not None else (1.0,))
        limits = getattr(self, "limits", None) or Limits.from_env()
        return answer_rows(model_input["image"], segmenter.predict, segmenter.class_names, cost, limits,
                           getattr(segmenter, "palette", None))


# What a served model's code needs whatever runs the net (PyTorch here, onnxruntime for fcnseg.export's model):
# request decoding and limits, answers, class names and palettes. Paths relative to the fcnseg package (its
# __init__ imports process_exit).
SERVING_CORE_MODULES = ("__init__.py", "process_exit.py", "errors.py", "image_io.py", "serving_io.py",
                        "serving_guard.py", "tta_spec.py", "data/__init__.py", "data/classes.py")
# What this model's code needs at inference (checked by tests/test_model_portability.py, which loads the model in a
# Python where the project is not importable).
BUNDLED_MODULES = SERVING_CORE_MODULES + (
    "serving.py", "inference.py", "viz.py", "tta.py", "data/dataset_spec.py", "data/transforms.py", "data/voc.py",
    "models/__init__.py", "models/fcn.py", "models/weights.py", "models/checkpoint.py", "runs.py",
)
# Top-level modules those modules import (albumentations + OpenCV normalise the input as evaluation does), each with
# the PyPI distributions that can provide it, most likely first (cv2 comes from one of OpenCV's four wheels).
REQUIRED_MODULES = {"torch": ("torch",), "numpy": ("numpy",), "pandas": ("pandas",), "PIL": ("pillow",),
                    "albumentations": ("albumentations",),
                    "cv2": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                            "opencv-contrib-python")}


def pinned_requirements() -> list[str]:
    """``name==version`` of the distribution installed here for each required module; local tags such as ``+cpu``
    dropped: PyPI has none. Looked up by name: mapping every installed distribution's files to its modules
    (``packages_distributions``) costs about a second per logged model, and is only the fallback."""
    pins = []
    for module, candidates in REQUIRED_MODULES.items():
        name, found = _installed(candidates)
        if found is None:
            name = (packages_distributions().get(module) or [module])[0]
            found = installed_version(name)
        pins.append(f"{name}=={found.split('+')[0]}")
    return pins


def _installed(names: tuple[str, ...]) -> tuple[str | None, str | None]:
    for name in names:
        try:
            return name, installed_version(name)
        except PackageNotFoundError:
            continue
    return None, None


def bundle_code(destination: Path, modules=None) -> Path:
    """Copies ``modules`` (default: those PyTorch inference needs) into ``destination/fcnseg``, a package MLflow
    puts on sys.path."""
    package = Path(__file__).resolve().parent
    target = destination / "fcnseg"
    for relative in BUNDLED_MODULES if modules is None else modules:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package / relative, target / relative)
    return target


def write_weights(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """A weights-only copy of an fcnseg checkpoint (:func:`fcnseg.models.checkpoint.weights_only`), in the
    checkpoint format, so ``Segmenter.from_checkpoint`` reads it as it is."""
    return atomic_torch_save(weights_only(read_checkpoint(checkpoint_path)), out_path)


def log_pyfunc_model(checkpoint_path: str | Path, example_images: list[np.ndarray], name: str = "model") -> str:
    """Logs the checkpoint's weights as a self-contained MLflow pyfunc model in the active run; returns its URI.
    The model's metadata (MLmodel ``metadata.dataset``) holds its dataset's name, class names, palette and ignore
    index, so the registry and its readers know the classes without loading the weights."""
    input_example = pd.DataFrame({"image": [encode_image(image) for image in example_images]})
    dataset = dataset_of(read_checkpoint(checkpoint_path))
    with tempfile.TemporaryDirectory(prefix="fcnseg-model-") as tmp:
        weights = write_weights(checkpoint_path, Path(tmp) / "weights.pt")
        code = bundle_code(Path(tmp) / "code")
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=FCNSegmenter(),
            artifacts={"weights": str(weights)},
            code_paths=[str(code)],
            signature=SIGNATURE,
            input_example=input_example,
            pip_requirements=pinned_requirements(),
            metadata={"dataset": dataset.to_metadata(), "num_classes": dataset.num_classes},
        )
    return info.model_uri
