"""Reading image files and bytes as HxWx3 uint8 RGB, torch-free: shared by ``fcnseg predict``, evaluation and both
served models (the PyTorch pyfunc and the ONNX one, which ships without torch).

An optional ``check(width, height)`` runs on the header alone, before a single pixel is decoded, so a request can
be refused by its size in microseconds (a 12 KB PNG can claim 100 megapixels).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fcnseg.errors import DataError, one_line

MAX_IMAGE_PIXELS = 100_000_000  # larger images are refused as decompression bombs


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Grayscale, palette, RGBA, CMYK and 16-bit images as HxWx3 uint8 RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # composite on white, not black
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _open(source, name: str, check: Callable[[int, int], None] | None = None) -> np.ndarray:
    previous_limit = Image.MAX_IMAGE_PIXELS  # PIL's limit is process-wide: ours applies to our reads only
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if check is not None:
                    check(*image.size)  # header only: nothing decoded yet
                image.load()
                # cameras store pixels sideways with an EXIF orientation tag; segment the picture as displayed
                return _to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{name}: refused as a decompression bomb (more than {MAX_IMAGE_PIXELS:,} pixels)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: not a readable image ({type(exc).__name__}: {one_line(exc)})") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def read_image(path: str | Path, check: Callable[[int, int], None] | None = None) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB; DataError naming the file when it cannot be read."""
    return _open(path, str(path), check)


def read_image_bytes(data: bytes, name: str = "image", check: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, …) as HxWx3 uint8 RGB."""
    return _open(io.BytesIO(data), name, check)
