"""Inference on whole images: read any image file as RGB, run a trained FCN, return the label map."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from fcnseg.data.classes import VOC_CLASSES
from fcnseg.data.dataset_spec import DatasetSpec
from fcnseg.data.transforms import normalize_image
from fcnseg.errors import CheckpointError, ConfigError, one_line
from fcnseg.image_io import MAX_IMAGE_PIXELS, read_image, read_image_bytes  # noqa: F401 (re-exported)
from fcnseg.models import build_fcn, load_reference_weights
from fcnseg.models.checkpoint import build_net
from fcnseg.runs import resolve_tracking_uri, using_store

PRECISIONS = ("fp32", "bf16")
# Overrides the default precision of every Segmenter (predict, evaluate, serving): fp32 or bf16.
PRECISION_ENV = "FCNSEG_INFERENCE_PRECISION"


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 matrix arithmetic


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def default_precision(device: torch.device) -> str:
    """bf16 autocast on CUDA (tensor cores) and on a CPU with AMX or AVX512-BF16 (argmax agreement with fp32
    tested >= 99.9%), fp32 elsewhere (a CPU without native bf16 emulates it, >10x slower);
    ``$FCNSEG_INFERENCE_PRECISION`` overrides both."""
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return os.environ.get(PRECISION_ENV) or ("bf16" if native else "fp32")


class Segmenter:
    """A trained FCN with its input normalisation, on the best available device.

    ``precision``: ``fp32``, or ``bf16`` (autocast; scores are returned as float32). ``channels_last``: the NHWC
    memory layout cuDNN's fastest convolutions use. Defaults: bf16 + channels_last on CUDA and on CPUs with AMX /
    AVX512-BF16, fp32 + contiguous on other CPUs (see :func:`default_precision`; ``$FCNSEG_INFERENCE_PRECISION``
    sets the precision everywhere).

    ``dataset``: the classes the net predicts (names, palette, ignore index), from its checkpoint or model; without
    it, ``class_names`` (default: VOC's for a 21-class net, ``class_<i>`` otherwise) with a generated palette.
    """

    def __init__(self, net: torch.nn.Module, normalization: str, class_names: list[str] | None = None,
                 device: str | torch.device | None = None, precision: str | None = None,
                 channels_last: bool | None = None, dataset: DatasetSpec | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = precision or default_precision(self.device)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r} "
                             f"(check ${PRECISION_ENV})")
        # NHWC: the fastest layout of cuDNN, and of oneDNN for bf16 on CPU
        default_layout = self.device.type == "cuda" or self.precision == "bf16"
        self.channels_last = default_layout if channels_last is None else bool(channels_last)
        self.net = net.eval().to(self.device)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.normalization = normalization
        self.dataset = dataset or DatasetSpec.from_metadata(None, getattr(net, "num_classes", None), class_names)
        self.class_names = list(self.dataset.class_names)
        self.palette = self.dataset.png_palette()  # label PNGs (predict, serving) in the dataset's colours
        self.tta = None  # a fcnseg.tta_spec.TTASpec: test-time augmentation of whole-image predictions

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        precision: str | None = None, channels_last: bool | None = None) -> "Segmenter":
        """From a checkpoint written by training or ``import-weights``: the net and its recorded normalisation.

        Reads the checkpoint without Lightning (which takes seconds to import and is not needed to predict).
        """
        net, normalization, dataset = build_net(path)
        return cls(net, normalization, list(dataset.class_names), device, precision, channels_last, dataset)

    def scores(self, images: list[np.ndarray]) -> torch.Tensor:
        """Class scores (N, C, H, W) for RGB uint8 images of one size."""
        return self.forward(torch.stack([normalize_image(image, self.normalization) for image in images]))

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Class scores (N, C, H, W) float32 of a normalised float32 batch on the host."""
        if self.device.type == "cuda":  # pinned host memory: the copy runs as a DMA, not through pageable memory
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            scores = self.net(batch)
        return scores.float()

    def predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Label maps (HxW uint8) for RGB uint8 images of one size; with :attr:`tta`, of the averaged softmax of
        the augmented passes (:func:`fcnseg.tta.tta_probabilities`)."""
        if self.tta is not None and self.tta.active:
            from fcnseg.tta import tta_probabilities

            return [tta_probabilities(self, image, self.tta).argmax(0).to(torch.uint8).cpu().numpy()
                    for image in images]
        return list(self.scores(images).argmax(1).to(torch.uint8).cpu().numpy())

    def predict(self, image: np.ndarray, tile_size: int | None = None) -> np.ndarray:
        """The label map of one whole image; with ``tile_size``, by overlapping windows (very large images)."""
        if tile_size and max(image.shape[:2]) > tile_size:
            return self.predict_sliding(image, tile_size)
        return self.predict_batch([image])[0]

    def predict_many(self, images: list[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Label maps for images of any sizes: images of the same size share a batch, so every image is
        segmented whole and exactly as on its own (no padding that would change the borders' scores)."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.shape[:2], []).append(index)
        out: list[np.ndarray | None] = [None] * len(images)
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                for index, label_map in zip(chunk, self.predict_batch([images[i] for i in chunk])):
                    out[index] = label_map
        return out  # type: ignore[return-value]

    def predict_sliding(self, image: np.ndarray, tile_size: int, overlap: float = 1 / 3) -> np.ndarray:
        """Averages the scores of overlapping ``tile_size`` windows: bounded memory for any image size (no TTA:
        the windows' averaging is its own ensemble, and TTA's up-scaled windows would break the memory bound)."""
        height, width = image.shape[:2]
        stride = max(1, int(tile_size * (1 - overlap)))
        total = torch.zeros(len(self.class_names), height, width)
        count = torch.zeros(1, height, width)

        def starts(length: int) -> list[int]:
            last = max(length - tile_size, 0)
            return sorted({*range(0, last + 1, stride), last})

        for top in starts(height):
            for left in starts(width):
                tile = np.ascontiguousarray(image[top : top + tile_size, left : left + tile_size])
                scores = self.scores([tile])[0].cpu()
                total[:, top : top + tile.shape[0], left : left + tile.shape[1]] += scores
                count[:, top : top + tile.shape[0], left : left + tile.shape[1]] += 1
        return (total / count).argmax(0).to(torch.uint8).numpy()


def segmenter_dataset(segmenter) -> DatasetSpec:
    """The classes a segmenter predicts: its dataset, or (an ONNX model's segmenter, which carries only its
    metadata) its class names and palette."""
    dataset = getattr(segmenter, "dataset", None)
    if dataset is not None:
        return dataset
    recorded = (getattr(segmenter, "metadata", None) or {}).get("dataset")  # an ONNX model's metadata.json
    if recorded:
        return DatasetSpec.from_metadata(recorded)
    names = list(segmenter.class_names)
    palette = getattr(segmenter, "palette", None)
    return DatasetSpec.from_metadata({"class_names": names,
                                      **({} if palette is None else {"palette": np.asarray(palette)[: len(names)]})})


def load_segmenter(model: str, device: str | None = None, variant: str | None = None,
                   precision: str | None = None, channels_last: bool | None = None,
                   tracking_uri: str | None = None) -> Segmenter:
    """A Segmenter from ``models:/NAME@ALIAS`` (or any MLflow model URI, looked up in ``tracking_uri``: see
    :func:`fcnseg.runs.resolve_tracking_uri`), an fcnseg ``.ckpt``, or a wkentaro/pytorch-fcn ``.pth`` (``variant``
    names the net: fcn32s, fcn16s, fcn8s, fcn8s_atonce).
    ``precision`` / ``channels_last``: see :class:`Segmenter` (None: the device's defaults)."""
    if "://" in model or model.startswith("models:/") or model.startswith("runs:/"):
        import mlflow.pyfunc  # only for registry models: checkpoints load without MLflow's import time

        try:
            with using_store(resolve_tracking_uri(tracking_uri)):
                loaded = mlflow.pyfunc.load_model(model)
        except Exception as exc:
            raise CheckpointError(f"cannot load MLflow model {model}: {one_line(exc)}; "
                                  f"check the name/alias with `fcnseg models`") from exc
        segmenter = loaded.unwrap_python_model().segmenter
        if device is not None or precision is not None or channels_last is not None:
            segmenter = Segmenter(segmenter.net.to(memory_format=torch.contiguous_format), segmenter.normalization,
                                  segmenter.class_names, device or segmenter.device, precision, channels_last,
                                  getattr(segmenter, "dataset", None))  # None: a model logged by older code
        return segmenter
    path = Path(model)
    if not path.is_file():
        raise CheckpointError(f"model not found: {model}; pass models:/NAME@ALIAS, a .ckpt or a pytorch-fcn .pth")
    if path.suffix == ".ckpt":
        return Segmenter.from_checkpoint(path, device, precision, channels_last)
    net = build_fcn(variant or "fcn8s", num_classes=len(VOC_CLASSES))
    load_reference_weights(net, path)
    # the Caffe nets expect BGR, 0-255, mean-subtracted input
    return Segmenter(net, "caffe", list(VOC_CLASSES), device, precision, channels_last)
