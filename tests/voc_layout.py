"""Writes small datasets in the PASCAL VOC 2012 directory layout (and SBD's), for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fcnseg.data.classes import voc_palette


def save_palette_png(label: np.ndarray, path: Path) -> None:
    """A VOC-style label: mode-P PNG whose pixel values are the class indices, coloured with the VOC palette."""
    png = Image.fromarray(label.astype(np.uint8), mode="P")
    png.putpalette(voc_palette().ravel().tolist())
    png.save(path)


def write_voc_layout(root: Path, samples: dict[str, tuple[np.ndarray, np.ndarray]],
                     splits: dict[str, list[str]]) -> Path:
    """``samples``: id -> (uint8 HxWx3 RGB image, uint8 HxW label); ``splits``: name -> ids. Returns ``root``."""
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (image, label) in samples.items():
        Image.fromarray(image, mode="RGB").save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        save_palette_png(label, root / "SegmentationClass" / f"{image_id}.png")
    for name, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def write_sbd_layout(sbd_root: Path, samples: dict[str, tuple[np.ndarray, np.ndarray]],
                     splits: dict[str, list[str]]) -> Path:
    """SBD's ``dataset/`` folder: ``img/<id>.jpg``, ``cls/<id>.mat`` (MATLAB struct ``GTcls`` with fields
    ``Segmentation``, ``Boundaries``, ``CategoriesPresent``, as in the real files), ``train.txt``, ``val.txt``."""
    from scipy.io import savemat

    sbd_root = Path(sbd_root)
    (sbd_root / "img").mkdir(parents=True, exist_ok=True)
    (sbd_root / "cls").mkdir(parents=True, exist_ok=True)
    for image_id, (image, label) in samples.items():
        Image.fromarray(image, mode="RGB").save(sbd_root / "img" / f"{image_id}.jpg", quality=95)
        present = np.unique(label[(label > 0) & (label < 255)]).astype(np.uint8)
        gtcls = {"Segmentation": label.astype(np.uint8), "Boundaries": np.empty((20, 1), dtype=object),
                 "CategoriesPresent": present}
        for i in range(20):
            gtcls["Boundaries"][i, 0] = np.zeros((1, 1), dtype=np.uint8)
        savemat(sbd_root / "cls" / f"{image_id}.mat", {"GTcls": gtcls})
    for name, ids in splits.items():
        (sbd_root / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return sbd_root


def random_sample(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A noise image and a label with a few class rectangles and a void (255) band, like VOC's boundaries."""
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(2):
        cls = int(rng.integers(1, 21))
        y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        label[y0 : y0 + height // 2, x0 : x0 + width // 2] = cls
    label[height // 3 : height // 3 + 2, :] = 255
    return image, label
