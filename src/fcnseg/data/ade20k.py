"""The ADE20K (MIT SceneParsing, ``ADEChallengeData2016.zip``) layout.

Layout under ``root`` (the ``ADEChallengeData2016`` directory)::

    images/{training,validation}/ADE_*.jpg   annotations/{training,validation}/ADE_*.png

Annotations hold 0 ("other") and the 150 classes as 1..150 (mode ``L``); ``data.reduce_zero_label``
(conf/data/ade20k.yaml) makes 0 the ignore index and 1..150 the training ids 0..149. ``train`` and ``val`` name
``training`` and ``validation``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fcnseg.data.dataset_spec import DatasetSpec
from fcnseg.data.reader import LabeledImages, Sample
from fcnseg.errors import DataError

SPLIT_DIRS = {"train": "training", "val": "validation"}
HINT = "fetch it with `dvc repro prepare` (data=ade20k), or point data.root at an ADEChallengeData2016 directory"


class ADE20KSegmentation(LabeledImages):
    """A split (``training`` / ``validation``, or ``train`` / ``val``) of ``ADEChallengeData2016``."""

    def __init__(self, root: str | Path, split: str, transform: Callable[..., dict[str, Any]] | None = None,
                 spec: DatasetSpec | None = None) -> None:
        self._bind(root, split, transform, spec, needs="the ADE20K layout needs its dataset spec")
        folder = SPLIT_DIRS.get(split, split)
        images_dir = self.root / "images" / folder
        if not images_dir.is_dir():
            raise DataError(f"{images_dir} does not exist (ADE20K splits: training, validation); {HINT}")
        samples = [Sample(image.stem, image, self.root / "annotations" / folder / f"{image.stem}.png")
                   for image in sorted(images_dir.glob("*.jpg"))]
        self._use_samples(samples, f"{images_dir}/*.jpg", f"re-extract the dataset ({HINT})")
