"""What both served models share, torch-free (the ONNX model ships it without torch): the request/answer schema,
the limits a server enforces, the forward pass's memory estimate, and one answer row per image.

A batch answers each image: good rows carry a mask and an empty ``error``; a bad row (not base64, not an image,
too large) carries its one-line ``error`` and no mask. When every row is bad the whole request is a 400 whose
``message`` is those rows' errors (MLflow's scoring server turns the ``MlflowException`` into the answer).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import io
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from fcnseg.data.classes import voc_palette
from fcnseg.errors import DataError, one_line
from fcnseg.image_io import read_image_bytes

OUTPUT_COLUMNS = ("mask", "height", "width", "class_pixels", "error")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([
        ColSpec("string", "mask"),
        ColSpec("long", "height"),
        ColSpec("long", "width"),
        ColSpec("string", "class_pixels"),
        ColSpec("string", "error"),
    ]),
)

MAX_REQUEST_MB_ENV = "FCNSEG_MAX_REQUEST_MB"  # largest request body a server reads (default 32 MB)
MAX_FORWARD_MB_ENV = "FCNSEG_MAX_FORWARD_MB"  # largest forward-pass memory one image may need (default 4096 MB)
MiB = 1024 * 1024


CONCURRENT_ENV = "FCNSEG_CONCURRENT_FORWARDS"  # forward passes a server runs at once (default 1)
_SLOTS: dict[int, threading.BoundedSemaphore] = {}


def _forward_slots(count: int) -> threading.BoundedSemaphore:
    """One process-wide semaphore per count: MLflow's server runs each request in its own thread, and N
    concurrent passes would need N times the memory the limit was checked against (the net already uses every
    core, so running them one at a time costs no throughput on CPU)."""
    return _SLOTS.setdefault(count, threading.BoundedSemaphore(count))


def _glibc_malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``, or a no-op where the C library is another (musl, macOS)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


# A forward pass frees hundreds of MB of activations, which glibc keeps in its heaps (one per thread MLflow's server
# ran a request in) instead of giving them back: the server's resident memory would stay at its high-water mark
# after a burst of photos. Trimming after each pass returns it; it costs milliseconds against a pass's seconds.
release_freed_memory = _glibc_malloc_trim()


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 32 * MiB
    max_forward_bytes: int = 4096 * MiB
    concurrent_forwards: int = 1

    @classmethod
    def from_env(cls) -> "Limits":
        def megabytes(name: str, default: int) -> int:
            value = os.environ.get(name, "")
            try:
                return int(float(value) * MiB) if value.strip() else default
            except ValueError:
                raise DataError(f"${name} must be a number of megabytes, got {value!r}") from None

        concurrent = os.environ.get(CONCURRENT_ENV, "").strip() or "1"
        if not concurrent.isdigit() or int(concurrent) < 1:
            raise DataError(f"${CONCURRENT_ENV} must be a positive integer, got {concurrent!r}")
        return cls(megabytes(MAX_REQUEST_MB_ENV, cls.max_request_bytes),
                   megabytes(MAX_FORWARD_MB_ENV, cls.max_forward_bytes), int(concurrent))


@dataclass(frozen=True)
class ForwardCost:
    """Bytes an fp32 forward pass of an FCN takes for one image, from the net's first conv width and class count.

    The net pads the input by 100 px on each side, and its peak holds two first-block activation maps and a few
    class-score maps of about that padded size (measured here with ru_maxrss, FCN-8s on CPU: 250-260 bytes per
    padded pixel at widths 1/16 and 1/4 for 21 classes, ~310 at width 1; this estimate is 284 and 764). TTA
    scales multiply the area by scale² and add two full-size probability maps.
    """

    first_channels: int
    num_classes: int
    scales: tuple[float, ...] = (1.0,)

    def forward_bytes(self, height: int, width: int) -> int:
        per_padded_pixel = 4 * (2 * self.first_channels + 3 * self.num_classes)
        peak = max(per_padded_pixel * (round(height * s) + 200) * (round(width * s) + 200) for s in self.scales)
        accumulate = 2 * 4 * self.num_classes * height * width if self.scales != (1.0,) else 0
        return peak + accumulate + 15 * height * width  # + the decoded uint8 image and its float32 input

    def check(self, limits: Limits, name: str) -> Callable[[int, int], None]:
        """A header check for :func:`fcnseg.image_io.read_image_bytes`: refuses before any pixel is decoded."""

        def refuse_if_too_large(width: int, height: int) -> None:
            needed = self.forward_bytes(height, width)
            if needed > limits.max_forward_bytes:
                raise DataError(
                    f"{name}: a {width}x{height} image needs about {needed / MiB:,.0f} MB to segment, over this "
                    f"server's limit of {limits.max_forward_bytes / MiB:,.0f} MB (${MAX_FORWARD_MB_ENV}); send a "
                    f"smaller image, or segment it with `fcnseg predict --tile-size 512`")

        return refuse_if_too_large


def encode_image(image: np.ndarray | Image.Image, format: str = "PNG") -> str:
    """An image as a base64 string, the models' input format."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_label_map(label_map: np.ndarray, palette: np.ndarray | None = None) -> str:
    """A label map as a base64 palette PNG (class indices as pixel values; the model's dataset's colours, the VOC
    palette unless given)."""
    image = Image.fromarray(np.asarray(label_map, dtype=np.uint8))
    colours = np.zeros((256, 3), np.uint8)
    given = voc_palette(256) if palette is None else np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
    colours[: len(given)] = given
    image.putpalette(colours.tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_label_map(mask_b64: str) -> np.ndarray:
    """The label map (HxW uint8 class indices) from an answer's ``mask`` column."""
    return np.array(Image.open(io.BytesIO(base64.b64decode(mask_b64))))


def decode_row(encoded, index: int, cost: ForwardCost, limits: Limits) -> np.ndarray:
    """Row ``index``'s image as RGB uint8; DataError (naming the row) when it is not base64 image data or its
    forward pass would need more memory than ``limits`` allow (checked on the header, before decoding)."""
    name = f"row {index}"
    if not isinstance(encoded, (str, bytes)):
        raise DataError(f"{name}: 'image' must be a base64 string, got {type(encoded).__name__}")
    try:
        data = base64.b64decode(encoded)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{name}: 'image' is not base64-encoded image data ({one_line(exc)})") from exc
    return read_image_bytes(data, name=name, check=cost.check(limits, name))


def answer_rows(images: Sequence, segment: Callable[[np.ndarray], np.ndarray], class_names: Sequence[str],
                cost: ForwardCost, limits: Limits, palette: np.ndarray | None = None) -> pd.DataFrame:
    """One answer row per request row (see the module docstring); an ``MlflowException`` (400) when none is good."""
    rows, errors = [], []
    for index, encoded in enumerate(images):
        try:
            image = decode_row(encoded, index, cost, limits)
            with _forward_slots(limits.concurrent_forwards):  # bounded peak memory under concurrent requests
                try:
                    label_map = segment(image)
                finally:
                    del image
                    release_freed_memory()
        except DataError as exc:
            errors.append(str(exc))
            rows.append({"mask": "", "height": 0, "width": 0, "class_pixels": "{}", "error": str(exc)})
            continue
        except MemoryError:
            message = f"row {index}: out of memory while segmenting; send a smaller image"
            errors.append(message)
            rows.append({"mask": "", "height": 0, "width": 0, "class_pixels": "{}", "error": message})
            continue
        counts = np.bincount(label_map.ravel(), minlength=len(class_names))
        names = list(class_names) + [f"class_{i}" for i in range(len(class_names), len(counts))]  # none dropped
        rows.append({
            "mask": encode_label_map(label_map, palette),
            "height": int(label_map.shape[0]),
            "width": int(label_map.shape[1]),
            "class_pixels": json.dumps({name: int(c) for name, c in zip(names, counts) if c}),
            "error": "",
        })
    if rows and len(errors) == len(rows):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        shown = "; ".join(errors[:3]) + (f"; and {len(errors) - 3} more bad rows" if len(errors) > 3 else "")
        raise MlflowException(shown, error_code=INVALID_PARAMETER_VALUE)
    return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
