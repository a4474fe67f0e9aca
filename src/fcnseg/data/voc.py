"""PASCAL VOC 2012 segmentation reader (VOC directory layout), with SBD for the paper's ``train_aug`` split.

Layout under ``root`` (a ``VOC2012`` directory)::

    JPEGImages/<id>.jpg  SegmentationClass/<id>.png  ImageSets/Segmentation/<split>.txt

Labels are palette (mode ``P``) or grayscale (mode ``L``) PNGs whose pixel values *are* the class indices
(0..20, 255 = void; another class list and ignore index through ``spec``, see :mod:`fcnseg.data.reader`); the
colours are never read. Two splits need no file under ``ImageSets/Segmentation``:

- ``seg11valid``: the FCN paper's 736 validation images (VOC 2011 val minus SBD train), packaged with fcnseg;
  all of them are VOC 2012 images. A ``seg11valid.txt`` in the dataset itself takes precedence.
- ``train_aug``: (VOC train ∪ SBD train ∪ SBD val) − VOC val = 10,582 images. Labels come from VOC's
  ``SegmentationClass`` PNG where VOC has one (it carries the void boundary band), else from SBD's
  ``cls/<id>.mat`` (``GTcls.Segmentation``); images from ``JPEGImages`` else SBD's ``img/<id>.jpg``.
  SBD is read from ``sbd_root``, by default ``<root>/../../SBD/benchmark_RELEASE/dataset``, i.e.
  ``<data_dir>/SBD/benchmark_RELEASE/dataset`` next to ``<data_dir>/VOCdevkit/VOC2012``, where
  ``fcnseg fetch --sbd`` (the prepare stage) extracts it.

Every problem with the files is raised as a one-line :class:`~fcnseg.errors.DataError` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from fcnseg.data.classes import NUM_CLASSES, voc_palette
from fcnseg.data.dataset_spec import DatasetSpec
from fcnseg.data.reader import LabeledImages, Sample, read_dataset_image, read_label_png
from fcnseg.errors import DataError, one_line

__all__ = ["VOCSegmentation", "Sample", "read_dataset_image", "read_label", "save_label_png", "as_label_map"]

PACKAGED_SPLITS: dict[str, Path] = {"seg11valid": Path(__file__).with_name("splits") / "seg11valid.txt"}
TRAIN_AUG = "train_aug"
COMPLETE_MARKER = ".complete"  # written last into a prepared dataset directory: without it, the directory is not ready
VOC_PALETTE = voc_palette(256)  # 255 (void) is (224, 224, 192), as in the VOC devkit
FETCH_HINT = "prepare it with `fcnseg fetch` (or `dvc repro`), or point data.root at a VOC2012 directory"


def default_sbd_root(root: str | Path) -> Path:
    """``<data_dir>/SBD/benchmark_RELEASE/dataset`` for ``root = <data_dir>/VOCdevkit/VOC2012``."""
    return Path(root).parent.parent / "SBD" / "benchmark_RELEASE" / "dataset"


def as_label_map(label_map: np.ndarray) -> np.ndarray:
    """``label_map`` as a 2-D uint8 array of class indices; ValueError when it cannot be one."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"a label map must be 2-D (H, W), got shape {label_map.shape}")
    if label_map.size and (label_map.min() < 0 or label_map.max() > 255):
        raise ValueError(f"label values must lie in [0, 255], got [{label_map.min()}, {label_map.max()}]")
    return label_map.astype(np.uint8, copy=False)


def save_label_png(label_map: np.ndarray, path_or_buffer: str | Path | BinaryIO,
                   palette: np.ndarray | None = None) -> None:
    """Writes a palette-mode PNG: pixel values are the class indices, the palette is ``palette`` (``(N, 3)`` uint8,
    e.g. :meth:`~fcnseg.data.dataset_spec.DatasetSpec.png_palette`; entries past N black) or VOC's (all 256 entries).

    This is the format of VOC's ``SegmentationClass`` files, so the devkit and :func:`read_label` get the indices back.
    """
    table = VOC_PALETTE if palette is None else np.zeros((256, 3), dtype=np.uint8)
    if palette is not None:
        colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
        table[: len(colours)] = colours
    image = Image.fromarray(as_label_map(label_map))  # mode "L"
    image.putpalette(table.tobytes())  # turns it into mode "P" without touching the indices
    if isinstance(path_or_buffer, (str, Path)):
        Path(path_or_buffer).parent.mkdir(parents=True, exist_ok=True)
    image.save(path_or_buffer, format="PNG")


def read_label(path: Path) -> np.ndarray:
    """uint8 HxW class indices from a palette/grayscale PNG or an SBD ``.mat`` (``GTcls.Segmentation``)."""
    return _read_sbd_label(path) if path.suffix == ".mat" else read_label_png(path)


def _read_sbd_label(path: Path) -> np.ndarray:
    from scipy.io import loadmat  # only train_aug needs scipy

    try:
        # struct_as_record=False + squeeze_me: the MATLAB struct GTcls becomes an object with a .Segmentation field
        mat = loadmat(path, squeeze_me=True, struct_as_record=False, variable_names=["GTcls"])
    except Exception as err:  # scipy raises many types for a corrupt file; each is a bad data file here
        raise DataError(f"cannot read SBD label {path} ({one_line(err)}); re-extract SBD with `fcnseg fetch --sbd`") \
            from err
    segmentation = getattr(mat.get("GTcls"), "Segmentation", None)
    if segmentation is None:
        raise DataError(f"SBD label {path} has no GTcls.Segmentation; it is not an SBD cls/*.mat file: "
                        "re-extract SBD with `fcnseg fetch --sbd`")
    return np.asarray(segmentation, dtype=np.uint8)


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


class VOCSegmentation(LabeledImages):
    """Items are ``(image uint8 HxWx3 RGB, mask uint8 HxW)``, or ``transform(image=, mask=)``'s ``(image, mask)``.

    ``transform`` is an albumentations ``Compose`` (see :mod:`fcnseg.data.transforms`). ``sbd_root`` is only read
    for ``split="train_aug"``. ``spec``: the dataset's classes, ignore index and label mapping (default: VOC's 21
    classes, or ``num_classes`` of them); a VOC-layout folder of your own classes gives its own spec.
    """

    def __init__(self, root: str | Path, split: str, transform: Callable[..., dict[str, Any]] | None = None,
                 sbd_root: str | Path | None = None, num_classes: int = NUM_CLASSES,
                 spec: DatasetSpec | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.sbd_root = Path(sbd_root) if sbd_root is not None else default_sbd_root(self.root)
        self.spec = spec or DatasetSpec.from_metadata(None, num_classes=num_classes)
        self.num_classes = self.spec.num_classes
        self._check_root()
        samples = self._train_aug_samples() if split == TRAIN_AUG else self._voc_samples()
        self._use_samples(samples, f"{self._split_source()} of {self.root}",
                          f"restore the files (`fcnseg fetch`) or remove the ids from {self._split_source()}")

    def read_label(self, path: Path) -> np.ndarray:
        return read_label(path)

    # -- construction ------------------------------------------------------------------------------------------

    @property
    def _split_dir(self) -> Path:
        return self.root / "ImageSets" / "Segmentation"

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise DataError(f"dataset root {self.root} does not exist; {FETCH_HINT}")
        if not any(self.root.iterdir()):
            raise DataError(f"dataset root {self.root} is empty (an interrupted extraction?); {FETCH_HINT}")

    def available_splits(self) -> list[str]:
        own = {path.stem for path in self._split_dir.glob("*.txt")} if self._split_dir.is_dir() else set()
        return sorted(own | set(PACKAGED_SPLITS) | {TRAIN_AUG})

    def _split_file(self, split: str) -> Path:
        path = self._split_dir / f"{split}.txt"
        if path.is_file():
            return path
        if split in PACKAGED_SPLITS:
            return PACKAGED_SPLITS[split]
        raise DataError(f"split file {path} does not exist; available splits: {', '.join(self.available_splits())}"
                        f" (set data.datamodule.train_split / val_split)")

    def _split_source(self) -> str:
        if self.split == TRAIN_AUG:
            return f"{self._split_dir}/{{train,val}}.txt and {self.sbd_root}/{{train,val}}.txt"
        return str(self._split_file(self.split))

    def _voc_samples(self) -> list[Sample]:
        return [self._voc_sample(image_id) for image_id in _read_ids(self._split_file(self.split))]

    def _voc_sample(self, image_id: str) -> Sample:
        return Sample(image_id, self.root / "JPEGImages" / f"{image_id}.jpg",
                      self.root / "SegmentationClass" / f"{image_id}.png")

    def _train_aug_samples(self) -> list[Sample]:
        sbd_lists = [self.sbd_root / "train.txt", self.sbd_root / "val.txt"]
        missing = [path for path in sbd_lists if not path.is_file()]
        if missing:
            raise DataError(f"split train_aug needs SBD at {self.sbd_root}, but {missing[0]} does not exist; "
                            "run `fcnseg fetch --sbd` (data=voc_sbd), or train on split 'train' (data=voc)")
        voc_train = set(_read_ids(self._split_file("train")))
        voc_val = set(_read_ids(self._split_file("val")))
        sbd = set(_read_ids(sbd_lists[0])) | set(_read_ids(sbd_lists[1]))
        samples = []
        for image_id in sorted((voc_train | sbd) - voc_val):
            voc = self._voc_sample(image_id)
            # VOC's own annotation where there is one (it has the void band); SBD's otherwise.
            image = voc.image if voc.image.is_file() else self.sbd_root / "img" / f"{image_id}.jpg"
            label = voc.label if voc.label.is_file() else self.sbd_root / "cls" / f"{image_id}.mat"
            samples.append(Sample(image_id, image, label))
        return samples
