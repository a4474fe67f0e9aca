"""Data: the layout readers (VOC/SBD, folder, Cityscapes, ADE20K), transforms and the LightningDataModule.

Attributes are imported on first use, so ``import fcnseg.data`` stays light (no Lightning, no albumentations).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fcnseg.data.datamodule import SegmentationDataModule, VOCDataModule, pad_collate
    from fcnseg.data.layouts import open_split
    from fcnseg.data.voc import VOCSegmentation

_EXPORTS = {
    "VOCSegmentation": "fcnseg.data.voc",
    "VOCDataModule": "fcnseg.data.datamodule",
    "SegmentationDataModule": "fcnseg.data.datamodule",
    "open_split": "fcnseg.data.layouts",
    "pad_collate": "fcnseg.data.datamodule",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
