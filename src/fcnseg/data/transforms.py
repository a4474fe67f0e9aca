"""Albumentations pipelines: training augmentation and whole-image evaluation.

Both take ``image=`` (uint8 HxWx3 RGB) and ``mask=`` (uint8 HxW class indices) and return a dict with ``image``
(float32 tensor 3xHxW, normalised for the backbone) and ``mask`` (uint8 tensor HxW, 255 = void). Masks stay uint8
up to the model's device, where the loss and the metrics take ``.long()`` of them: worker IPC, pinned memory and
the host-to-device copy move 8x fewer mask bytes than int64 would.
"""

import os
from dataclasses import dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # importing albumentations otherwise asks PyPI for updates

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations.augmentations.crops import functional as fcrops  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fcnseg.data.classes import IGNORE_INDEX  # noqa: E402
from fcnseg.errors import ConfigError  # noqa: E402


@dataclass(frozen=True)
class Normalization:
    """How pixels are fed to the backbone: ``(pixel / max_pixel_value - mean) / std`` per channel, in channel order
    RGB, or BGR when ``bgr`` (``mean`` and ``std`` are given in that same order)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixel_value: float
    bgr: bool


NORMALIZATIONS: dict[str, Normalization] = {
    # torchvision's ImageNet weights: RGB in [0, 1], ImageNet mean/std.
    "imagenet": Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), max_pixel_value=255.0, bgr=False),
    # Caffe-converted weights (the paper's VGG16 / FCN nets): BGR, 0-255, mean subtraction only.
    "caffe": Normalization(
        mean=(104.00698793, 116.66876762, 122.67891434), std=(1.0, 1.0, 1.0), max_pixel_value=1.0, bgr=True
    ),
}


def get_normalization(name: str) -> Normalization:
    try:
        return NORMALIZATIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown normalization {name!r}; set model.normalization to one of {sorted(NORMALIZATIONS)}"
        ) from None


# Module-level functions (not lambdas) so the pipelines pickle into DataLoader worker processes.
def _rgb_to_bgr(image: np.ndarray, **_: object) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1])


def _normalize_steps(normalization: str) -> list[A.BasicTransform]:
    norm = get_normalization(normalization)
    steps: list[A.BasicTransform] = [A.Lambda(image=_rgb_to_bgr, name="rgb_to_bgr")] if norm.bgr else []
    steps.append(A.Normalize(mean=norm.mean, std=norm.std, max_pixel_value=norm.max_pixel_value))
    return steps


class RandomCropAtMost(A.RandomCrop):
    """``RandomCrop`` that keeps a side shorter than the crop whole instead of failing or padding.

    It lets the training pipeline crop the uint8 image first, so colour jitter and normalisation touch
    ``crop_size``² pixels rather than the whole rescaled image (up to 4x VOC size), and pad afterwards.
    """

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        h_start, w_start = self.py_random.random(), self.py_random.random()
        size = (min(self.height, height), min(self.width, width))
        return {"crop_coords": fcrops.get_crop_coords((height, width), size, h_start, w_start), "pad_params": None}


def build_train_transform(
    crop_size: int | None,
    scale_min: float = 0.5,
    scale_max: float = 2.0,
    hflip: bool = True,
    color_jitter: float = 0.0,
    normalization: str = "imagenet",
    seed: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> A.Compose:
    """Random scale, flip, random crop, colour jitter, normalise, pad to ``crop_size`` (image 0, mask
    ``ignore_index``: the dataset's, 255 by default).

    Cropping comes first, on uint8 pixels, so the per-pixel work after it is bounded by the crop (a 2x faster
    pipeline). Padding comes after normalisation so padded pixels are 0 in the network's input space (like the
    batch padding of the validation loader) and void in the mask, so loss and metrics ignore them. A side shorter
    than the crop is padded on both ends (centred), as padding before a random crop would place it.

    ``crop_size=None`` trains on whole images at their own size (the paper's batch-1 recipe): no crop, no padding.
    A scale range of exactly 1 adds no resampling step, so with ``hflip=False`` and no jitter the training input is
    the evaluation input.
    """
    if not 0 < scale_min <= scale_max:
        raise ConfigError(f"train_transform needs 0 < scale_min <= scale_max, got {scale_min} and {scale_max}")
    if crop_size is not None and (isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 1):
        raise ConfigError(
            f"train_transform.crop_size must be a positive integer or null (whole images), got {crop_size!r}"
        )
    steps: list[A.BasicTransform] = []
    if (scale_min, scale_max) != (1.0, 1.0):
        steps.append(
            A.RandomScale(
                scale_limit=(scale_min - 1.0, scale_max - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,  # labels are indices: never blend them
                p=1.0,
            )
        )
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if crop_size is not None:
        steps.append(RandomCropAtMost(height=crop_size, width=crop_size))
    if color_jitter > 0:
        steps.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0))
    steps += _normalize_steps(normalization)
    if crop_size is not None:
        steps.append(
            A.PadIfNeeded(
                min_height=crop_size,
                min_width=crop_size,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,
            )
        )
    steps.append(A.ToTensorV2())
    return A.Compose(steps, strict=True, seed=seed)


def build_eval_transform(normalization: str = "imagenet") -> A.Compose:
    """The whole image at its own size: normalise and convert to tensors."""
    return A.Compose([*_normalize_steps(normalization), A.ToTensorV2()], strict=True)


def normalize_image(image: np.ndarray, normalization: str = "imagenet") -> torch.Tensor:
    """uint8 HxWx3 RGB → float32 3xHxW network input, exactly as the evaluation transform makes it."""
    return build_eval_transform(normalization)(image=image)["image"]
