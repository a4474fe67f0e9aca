"""What every layout reader shares: a list of (id, image, label) files, read, mapped to training ids and checked.

A layout (VOC, folder, Cityscapes, ADE20K) only says which files form a split; :class:`LabeledImages` reads them.
Labels are mode ``L`` or ``P`` PNGs whose pixel values are the stored label values (a palette's colours are never
read); the dataset's label mapping (:meth:`~fcnseg.data.dataset_spec.DatasetSpec.encode_labels`: Cityscapes'
labelId→trainId, ADE20K's reduce-zero-label) turns them into training ids, which are then checked against the
dataset's classes and ignore index. Every problem with a file is one :class:`~fcnseg.errors.DataError` line naming
the file and, for label values, the values found and the config key that decides them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from fcnseg.data.dataset_spec import DatasetSpec
from fcnseg.errors import ConfigError, DataError, one_line


class Sample(NamedTuple):
    id: str
    image: Path
    label: Path


def read_dataset_image(path: Path) -> np.ndarray:
    """A dataset's image as uint8 HxWx3 RGB, its pixels as stored: no EXIF orientation is applied, since the label
    PNG is aligned with the stored pixels (``fcnseg.inference.read_image`` reads a user's photo as displayed)."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy: torch warns on read-only arrays
    except Exception as err:  # PIL's decoders raise many types on damaged bytes (found by fuzzing): all bad files
        raise DataError(f"cannot read image {path} ({one_line(err)}); re-extract the dataset or remove the file "
                        "and its id from the split") from err


def read_label_png(path: Path) -> np.ndarray:
    """uint8 HxW stored label values of a palette (``P``) or grayscale (``L``) PNG: a palette's indices, never its
    colours."""
    try:
        with Image.open(path) as label:
            label.load()
            if label.mode not in ("P", "L"):
                raise DataError(
                    f"label {path} is a mode-{label.mode} image; the label must be a palette (P) or grayscale (L) "
                    "index PNG whose pixel values are class ids, not colours: save the class indices with the VOC "
                    "palette"
                )
            return np.array(label, dtype=np.uint8)
    except DataError:
        raise
    except Exception as err:  # as in read_dataset_image: any decoder failure is a bad file
        raise DataError(f"cannot read label {path} ({one_line(err)}); re-extract the dataset or remove the file "
                        "and its id from the split") from err


def _values(values: np.ndarray) -> str:
    shown = values.tolist()[:10]
    return f"{shown}{' …' if values.size > 10 else ''}"


def label_problem(spec: DatasetSpec, stored: np.ndarray, mapped: np.ndarray) -> str | None:
    """Why a label's values do not fit the dataset (stored values → training ids ``mapped``), or None: the values
    found and the config key that decides them."""
    if spec.ignore_index <= 255 and mapped.dtype == np.uint8:
        counts = np.bincount(mapped.ravel(), minlength=256)
        counts[: spec.num_classes] = 0
        counts[spec.ignore_index] = 0
        bad = np.flatnonzero(counts)
    else:
        bad = np.asarray(spec.invalid_values(mapped))
    if not bad.size:
        return None
    classes = f"the {spec.num_classes} classes 0..{spec.num_classes - 1} of data.class_names"
    ignore = f"ignore value {spec.ignore_index} (data.ignore_index)"
    if spec.label_map is None and not spec.reduce_zero_label:
        return f"has values {_values(bad)} outside {classes} and the {ignore}; fix the label, or list one name " \
               "per class in data.class_names (or map stored values with data.label_map)"
    stored_bad = np.unique(stored[np.isin(mapped, bad)])
    key = "data.label_map" if spec.label_map is not None else "data.reduce_zero_label"
    return f"has stored values {_values(stored_bad)} that {key} turns into {_values(bad)}, outside {classes} and " \
           f"the {ignore}; fix the label or {key}"


class LabeledImages:
    """Items are ``(image uint8 HxWx3 RGB, mask uint8 HxW training ids)``, or ``transform(image=, mask=)``'s pair.

    A map-style dataset (``__len__`` and ``__getitem__``: all a torch ``DataLoader`` asks for) that does not subclass
    torch's ``Dataset``, so that listing a split (the register stage's lineage, ``fcnseg reproduce``) imports no torch.

    Subclasses find the split's :class:`Sample` list and call :meth:`_use_samples`; ``spec`` is the dataset.
    ``transform`` is an albumentations ``Compose`` (see :mod:`fcnseg.data.transforms`), applied after the label
    mapping, so augmentation and padding only ever see training ids and the ignore index.
    """

    spec: DatasetSpec
    split: str
    samples: list[Sample]
    ids: list[str]
    transform: Callable[..., dict[str, Any]] | None

    def _bind(self, root: str | Path, split: str, transform: Callable[..., dict[str, Any]] | None,
              spec: DatasetSpec | None, needs: str) -> None:
        """What every layout's reader starts with: its root, split and transform, and the spec it cannot do without
        (``needs`` says so when it is missing)."""
        self.root, self.split, self.transform = Path(root), split, transform
        if spec is None:
            raise ConfigError(f"{needs}: pass spec=dataset_spec(cfg.data)")
        self.spec = spec

    def _use_samples(self, samples: list[Sample], where: str, hint: str) -> None:
        """``where``: what lists the split (for messages); ``hint``: how to restore missing files."""
        self.samples = samples
        if not samples:
            raise DataError(f"split {self.split!r} lists no images; check {where}")
        problems = []
        for sample in samples:  # fail before training starts, not hours in
            if not sample.image.is_file():
                problems.append(f"image {sample.image} listed in split {self.split!r} does not exist")
            elif not sample.label.is_file():
                problems.append(f"image {sample.image} has no label at {sample.label}")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DataError(f"{problems[0]}{more}; {hint}")
        self.ids = [sample.id for sample in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, path: Path) -> np.ndarray:
        return read_label_png(path)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        sample = self.samples[index]
        image = read_dataset_image(sample.image)
        stored = self.read_label(sample.label)
        if stored.shape != image.shape[:2]:
            raise DataError(
                f"label {sample.label} is {stored.shape[1]}x{stored.shape[0]} (WxH) but image {sample.image} is "
                f"{image.shape[1]}x{image.shape[0]}; a label must have its image's size: re-export the label"
            )
        mask = self.spec.encode_labels(stored)
        problem = label_problem(self.spec, stored, mask)
        if problem:
            raise DataError(f"label {sample.label} {problem}")
        if self.transform is None:
            return image, mask
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"]
