"""``fcnseg export``: a trained FCN as an ONNX file with dynamic batch, height and width, checked for parity against
PyTorch before it is written, and optionally registered as a torch-free MLflow model (:mod:`fcnseg.onnx_model`).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import version as installed_version
from pathlib import Path

import numpy as np
import torch

from fcnseg.data.classes import voc_palette
from fcnseg.data.transforms import get_normalization
from fcnseg.errors import CheckpointError
from fcnseg.inference import Segmenter
from fcnseg.runs import experiment_id, resolve_tracking_uri, using_store

# (height, width) checked at export: tiny, odd, portrait, landscape, and a VOC-sized image
PARITY_SIZES = ((1, 1), (7, 5), (33, 47), (64, 64), (61, 100), (375, 500))
MIN_ARGMAX_AGREEMENT = 0.999
MAX_ABS_DIFF = 1e-3  # relative to the largest |logit| (at least 1)
OPSET = 17

# What the ONNX model's code needs besides fcnseg.serving.SERVING_CORE_MODULES (all torch-free)
ONNX_RUNTIME_MODULES = ("onnx_model.py",)
ONNX_REQUIREMENTS = ("onnxruntime", "numpy", "pillow")


@dataclass
class Parity:
    sizes: list[tuple[int, int]]
    max_abs_diff: float
    argmax_agreement: float  # the lowest over the sizes

    @property
    def ok(self) -> bool:
        return self.argmax_agreement >= MIN_ARGMAX_AGREEMENT and self.max_abs_diff <= MAX_ABS_DIFF


def metadata_for(segmenter: Segmenter) -> dict:
    """What the ONNX model needs besides the net: class names, palette (the dataset's label PNG colours),
    normalisation, first conv width, and the dataset's metadata."""
    norm = get_normalization(segmenter.normalization)
    palette = getattr(segmenter, "palette", None)
    dataset = getattr(segmenter, "dataset", None)
    return {
        "class_names": list(segmenter.class_names),
        "palette": (voc_palette(256) if palette is None else np.asarray(palette, np.uint8)).tolist(),
        "dataset": dataset.to_metadata() if dataset is not None else None,
        "normalization": {"name": segmenter.normalization, "mean": list(norm.mean), "std": list(norm.std),
                          "max_pixel_value": norm.max_pixel_value, "bgr": norm.bgr},
        "first_channels": int(segmenter.net.conv1_1.out_channels),
    }


def check_parity(segmenter: Segmenter, onnx_path: Path, sizes=PARITY_SIZES, seed: int = 0) -> Parity:
    """Logits max-abs difference (relative to max(1, max |logit|)) and the lowest argmax agreement between
    onnxruntime and the PyTorch net (fp32) over random images of ``sizes``, two per size (batch 2)."""
    from fcnseg.onnx_model import OnnxSegmenter

    session = OnnxSegmenter(onnx_path, metadata_for(segmenter))
    reference = Segmenter(segmenter.net, segmenter.normalization, segmenter.class_names, device="cpu",
                          precision="fp32", channels_last=False)
    rng = np.random.default_rng(seed)
    worst_diff, worst_agreement = 0.0, 1.0
    for height, width in sizes:
        images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2)]
        expected = reference.scores(images).cpu().numpy()
        got = session.scores(images)
        if got.shape != expected.shape:
            raise CheckpointError(f"ONNX export gives scores of shape {got.shape} for a {height}x{width} input, "
                                  f"PyTorch {expected.shape}")
        worst_diff = max(worst_diff, float(np.abs(got - expected).max() / max(1.0, np.abs(expected).max())))
        worst_agreement = min(worst_agreement, float((got.argmax(1) == expected.argmax(1)).mean()))
    return Parity([tuple(s) for s in sizes], worst_diff, worst_agreement)


def export_onnx(segmenter: Segmenter, out_path: str | Path, sizes=PARITY_SIZES) -> Parity:
    """Writes the segmenter's net as ONNX to ``out_path`` only if it passes :func:`check_parity`; a
    CheckpointError (and no file) otherwise."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    net = segmenter.net.to("cpu", memory_format=torch.contiguous_format).float().eval()
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with warnings.catch_warnings():
            # the TorchScript-based exporter: the torch.export one specialises the paper's crops to one size
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(net, (torch.zeros(1, 3, 64, 64),), str(tmp), input_names=["image"],
                              output_names=["scores"], dynamic_axes={"image": axes, "scores": axes},
                              opset_version=OPSET, dynamo=False)
        parity = check_parity(segmenter, tmp, sizes)
        if not parity.ok:
            raise CheckpointError(
                f"ONNX export failed parity: argmax agreement {parity.argmax_agreement:.5f} (need "
                f">= {MIN_ARGMAX_AGREEMENT}), max abs logit difference {parity.max_abs_diff:.2e} (need <= "
                f"{MAX_ABS_DIFF:g}); nothing written to {out_path}")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return parity


def bundle_onnx_code(destination: Path) -> Path:
    from fcnseg.serving import SERVING_CORE_MODULES, bundle_code  # here: importing fcnseg.export loads no MLflow

    return bundle_code(destination, SERVING_CORE_MODULES + ONNX_RUNTIME_MODULES)


def log_onnx_model(onnx_path: str | Path, metadata: dict, example_images: list[np.ndarray],
                   name: str = "model") -> str:
    """Logs the ONNX net as a pyfunc on onnxruntime in the active run (requirements: onnxruntime, numpy, pillow,
    pinned to the versions here; MLflow adds itself); returns its URI."""
    import mlflow.pyfunc
    import pandas as pd

    from fcnseg.onnx_model import OnnxPyfunc
    from fcnseg.serving_io import SIGNATURE, encode_image

    with tempfile.TemporaryDirectory(prefix="fcnseg-onnx-") as tmp:
        meta = Path(tmp) / "metadata.json"
        meta.write_text(json.dumps(metadata))
        code = bundle_onnx_code(Path(tmp) / "code")
        info = mlflow.pyfunc.log_model(
            name=name, python_model=OnnxPyfunc(),
            artifacts={"onnx": str(onnx_path), "metadata": str(meta)}, code_paths=[str(code)],
            signature=SIGNATURE, input_example=pd.DataFrame({"image": [encode_image(i) for i in example_images]}),
            pip_requirements=[f"{name}=={installed_version(name)}" for name in ONNX_REQUIREMENTS],
            metadata={"dataset": metadata.get("dataset"), "num_classes": len(metadata["class_names"])},
        )
    return info.model_uri


def export_and_register(segmenter: Segmenter, out_path: str | Path, register: str | None, source: str,
                        tracking_uri: str | None = None) -> tuple[Parity, str | None]:
    """Exports (parity-checked); with ``register``, logs the ONNX model in an MLflow run and registers a version
    of ``register`` tagged with its source and parity. Returns (parity, version or None)."""
    parity = export_onnx(segmenter, out_path)
    if not register:
        return parity, None
    import mlflow

    metadata = {**metadata_for(segmenter), "parity": asdict(parity), "source": source}
    rng = np.random.default_rng(0)
    example = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)]
    uri = resolve_tracking_uri(tracking_uri)
    exports = experiment_id(mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), "fcnseg-export")
    with using_store(uri):
        with mlflow.start_run(experiment_id=exports, run_name=f"export-onnx {register}"):
            mlflow.log_params({"format": "onnx", "source": source[:500], "opset": OPSET})
            mlflow.log_metrics({"parity_max_abs_diff": parity.max_abs_diff,
                                "parity_argmax_agreement": parity.argmax_agreement})
            model_uri = log_onnx_model(out_path, metadata, example)
        version = mlflow.register_model(model_uri, register,
                                        tags={"fcnseg.format": "onnx", "fcnseg.source": source[:500],
                                              "parity_argmax_agreement": f"{parity.argmax_agreement:.6f}",
                                              "parity_max_abs_diff": f"{parity.max_abs_diff:.3e}"})
    return parity, version.version


class OnnxRuntimeSegmenter(Segmenter):
    """A :class:`~fcnseg.inference.Segmenter` whose scores come from onnxruntime (the net exported to a temporary,
    parity-checked ONNX file): ``predict``, ``predict_many`` and ``predict_sliding`` work as they do for PyTorch."""

    def __init__(self, segmenter: Segmenter, threads: int | None = None) -> None:
        from fcnseg.onnx_model import OnnxSegmenter

        super().__init__(segmenter.net, segmenter.normalization, segmenter.class_names, device="cpu",
                         precision="fp32", channels_last=False, dataset=getattr(segmenter, "dataset", None))
        with tempfile.TemporaryDirectory(prefix="fcnseg-onnx-") as tmp:
            self.parity = export_onnx(self, Path(tmp) / "model.onnx", sizes=((33, 47), (64, 64)))
            self.onnx = OnnxSegmenter(Path(tmp) / "model.onnx", metadata_for(self), threads)  # loaded: file may go

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.onnx.session.run(None, {self.onnx.input_name: batch.numpy()})[0])
