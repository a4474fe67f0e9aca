"""Which reader reads a dataset: ``data.layout`` (voc, folder, cityscapes, ade20k) → its reader class.

:func:`open_split` is the one way in for everything that reads a split (the datamodule, evaluation, lineage's
evaluation-set hash, example images): items are ``(image uint8 HxWx3 RGB, mask uint8 HxW training ids)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fcnseg.data.ade20k import ADE20KSegmentation
from fcnseg.data.cityscapes import CityscapesSegmentation
from fcnseg.data.dataset_spec import DatasetSpec, dataset_spec
from fcnseg.data.folder import FolderSegmentation
from fcnseg.data.reader import LabeledImages
from fcnseg.data.voc import VOCSegmentation
from fcnseg.errors import ConfigError

READERS: dict[str, type[LabeledImages]] = {
    "voc": VOCSegmentation,
    "folder": FolderSegmentation,
    "cityscapes": CityscapesSegmentation,
    "ade20k": ADE20KSegmentation,
}


def open_split(data: Mapping[str, Any] | DatasetSpec, split: str, root: str | Path | None = None,
               transform: Callable[..., dict[str, Any]] | None = None, sbd_root: str | Path | None = None,
               ) -> LabeledImages:
    """The ``split`` of a dataset, read by its layout's reader. ``data``: a data config (``cfg.data`` or its dict;
    ``root`` defaults to its ``root``) or a :class:`DatasetSpec` (then ``root`` is required). ``sbd_root``: VOC's
    SBD for ``train_aug``."""
    if isinstance(data, DatasetSpec):
        spec = data
        if root is None:
            raise ConfigError("open_split(spec, split) needs the dataset's root directory")
    else:
        spec = dataset_spec(data)
        root = root if root is not None else data.get("root")
        if not root:
            raise ConfigError(f"data.root is not set for dataset {spec.name!r}: point it at the dataset directory")
    if spec.layout == "voc":
        return VOCSegmentation(root, split, transform, sbd_root=sbd_root, spec=spec)
    return READERS[spec.layout](root, split, transform, spec=spec)
