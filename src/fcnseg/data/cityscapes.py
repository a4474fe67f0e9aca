"""The Cityscapes layout (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip`` extracted into ``root``).

Layout under ``root``::

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The label files hold Cityscapes' labelIds (0..33, mode ``L``); ``data.label_map`` (conf/data/cityscapes.yaml: the
official labelId→trainId table) turns them into the 19 training classes, every other labelId into the ignore index.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fcnseg.data.dataset_spec import DatasetSpec
from fcnseg.data.reader import LabeledImages, Sample
from fcnseg.errors import DataError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
HINT = ("log in at https://www.cityscapes-dataset.com/downloads/, download leftImg8bit_trainvaltest.zip and "
        "gtFine_trainvaltest.zip, set data.zips.leftImg8bit / data.zips.gtFine to them and run `dvc repro prepare`, "
        "or point data.root at a directory holding leftImg8bit/ and gtFine/")


class CityscapesSegmentation(LabeledImages):
    """A split (``train``, ``val``, ``test``) of a Cityscapes directory; labels mapped by ``spec.label_map``."""

    def __init__(self, root: str | Path, split: str, transform: Callable[..., dict[str, Any]] | None = None,
                 spec: DatasetSpec | None = None) -> None:
        self._bind(root, split, transform, spec, needs="the Cityscapes layout needs its dataset spec")
        images_dir = self.root / "leftImg8bit" / split
        if not images_dir.is_dir():
            available = sorted(p.name for p in (self.root / "leftImg8bit").iterdir() if p.is_dir()) \
                if (self.root / "leftImg8bit").is_dir() else []
            have = f" (available splits: {', '.join(available)})" if available else ""
            raise DataError(f"{images_dir} does not exist{have}; {HINT}")
        samples = []
        for image in sorted(images_dir.glob(f"*/*{IMAGE_SUFFIX}")):
            stem = image.name.removesuffix(IMAGE_SUFFIX)
            label = self.root / "gtFine" / split / image.parent.name / f"{stem}{LABEL_SUFFIX}"
            samples.append(Sample(stem, image, label))
        self._use_samples(samples, f"{images_dir}/<city>/*{IMAGE_SUFFIX}", f"re-extract the zips ({HINT})")
