"""Albumentations pipelines: crop size, void padding of masks, whole-image eval, backbone normalisations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcnseg.data.transforms import NORMALIZATIONS, build_eval_transform, build_train_transform, normalize_image
from fcnseg.errors import ConfigError

RGB = (200, 100, 50)


def constant_sample(height: int, width: int, cls: int = 7) -> tuple[np.ndarray, np.ndarray]:
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = RGB
    return image, np.full((height, width), cls, dtype=np.uint8)


@pytest.mark.parametrize("height, width", [(20, 24), (90, 70)])
def test_train_output_is_a_crop_of_crop_size(height, width):
    transform = build_train_transform(crop_size=48, seed=0)
    image, mask = constant_sample(height, width)
    out = transform(image=image, mask=mask)
    assert out["image"].shape == (3, 48, 48) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (48, 48) and out["mask"].dtype == torch.uint8


def test_train_padding_is_void_in_the_mask_and_zero_in_the_image():
    transform = build_train_transform(crop_size=64, scale_min=1.0, scale_max=1.0, hflip=False, seed=0)
    image, mask = constant_sample(20, 30, cls=7)
    out = transform(image=image, mask=mask)
    labels = out["mask"]
    assert set(labels.unique().tolist()) == {7, 255}  # never 0 (background) where there was no image
    assert int((labels == 7).sum()) == 20 * 30
    padded = labels == 255
    assert torch.all(out["image"][:, padded] == 0)
    assert torch.all(out["image"][:, ~padded] != 0)


def test_train_transform_is_reproducible_from_its_seed():
    image, mask = constant_sample(40, 50)
    image = np.random.default_rng(0).integers(0, 256, image.shape, dtype=np.uint8)
    first = [build_train_transform(crop_size=32, seed=3)(image=image, mask=mask)["image"] for _ in range(2)]
    other = build_train_transform(crop_size=32, seed=4)(image=image, mask=mask)["image"]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], other)


def test_eval_keeps_the_size_and_the_labels():
    image, mask = constant_sample(33, 47)
    mask[5:9, 3:40] = 255
    out = build_eval_transform()(image=image, mask=mask)
    assert out["image"].shape == (3, 33, 47)
    assert torch.equal(out["mask"], torch.from_numpy(mask))


def test_imagenet_normalisation_is_rgb_mean_std():
    image, _ = constant_sample(4, 5)
    pixel = normalize_image(image, "imagenet")[:, 0, 0]
    norm = NORMALIZATIONS["imagenet"]
    expected = (torch.tensor(RGB) / 255.0 - torch.tensor(norm.mean)) / torch.tensor(norm.std)
    torch.testing.assert_close(pixel, expected.float())


def test_caffe_normalisation_is_bgr_0_255_minus_mean():
    image, _ = constant_sample(4, 5)
    pixel = normalize_image(image, "caffe")[:, 0, 0]
    b, g, r = 50.0, 100.0, 200.0
    expected = torch.tensor([b - 104.00698793, g - 116.66876762, r - 122.67891434])
    torch.testing.assert_close(pixel, expected.float())


def test_unknown_normalisation_is_a_config_error():
    with pytest.raises(ConfigError, match="imagenet"):
        build_eval_transform("vgg")
