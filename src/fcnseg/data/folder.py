"""The folder layout, the one most people have: ``images/`` and ``masks/`` with matching file stems.

Layout under ``root`` (directory names are ``data.folder.images`` / ``masks`` / ``splits``)::

    images/<stem>.jpg|.jpeg|.png|…   masks/<stem>.png   [splits/<split>.txt: one stem per line]

Split lists are optional. Without any, the split is deterministic: each stem's place is the SHA-256 of
``"<split_seed>:<stem>"``, the first ``val_fraction`` of the stems (at least one) are ``val``, the rest ``train``
(``all`` is every stem). It depends on the stems, the fraction and the seed only, not on the file system's order or
the machine. The prepare stage records it: it writes the lists into the prepared
dataset (``splits/train.txt``, ``splits/val.txt``), so the DVC hash of the data covers the split.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fcnseg.data.dataset_spec import DatasetSpec
from fcnseg.data.reader import LabeledImages, Sample
from fcnseg.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULTS: dict[str, Any] = {"images": "images", "masks": "masks", "splits": "splits", "val_fraction": 0.2,
                            "split_seed": 0}
RATIO_SPLITS = ("train", "val", "all")
log = logging.getLogger(__name__)


def folder_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``data.folder`` with its defaults filled in; a fraction outside (0, 1) is refused."""
    merged = {**DEFAULTS, **{k: v for k, v in dict(options or {}).items() if v is not None}}
    if not 0 < float(merged["val_fraction"]) < 1:
        raise ConfigError(f"data.folder.val_fraction={merged['val_fraction']} must lie strictly between 0 and 1")
    return merged


def find_pairs(root: Path, options: Mapping[str, Any]) -> dict[str, Sample]:
    """Every ``images/<stem>.*`` with its ``masks/<stem>.png``, by stem (sorted); one line for what is amiss."""
    images_dir, masks_dir = root / options["images"], root / options["masks"]
    for folder, key in ((images_dir, "images"), (masks_dir, "masks")):
        if not folder.is_dir():
            raise DataError(f"{folder} does not exist; the folder layout needs {root}/{options['images']}/ and "
                            f"{root}/{options['masks']}/ with matching file stems (data.folder.{key} names it)")
    images: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            if path.stem in images:
                raise DataError(f"{images[path.stem].name} and {path.name} in {images_dir} share the stem "
                                f"{path.stem!r}; keep one image per stem")
            images[path.stem] = path
    masks = {path.stem: path for path in masks_dir.glob("*.png")}
    unlabeled = sorted(set(images) - set(masks))
    if unlabeled:
        more = f" (and {len(unlabeled) - 1} more)" if len(unlabeled) > 1 else ""
        raise DataError(f"image {images[unlabeled[0]]} has no mask {masks_dir / (unlabeled[0] + '.png')}{more}; "
                        f"every image needs a label PNG of the same stem in {masks_dir}")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise DataError(f"mask {masks[orphans[0]]} has no image in {images_dir}{more}; remove it or add its image")
    if not images:
        raise DataError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return {stem: Sample(stem, images[stem], masks[stem]) for stem in sorted(images)}


def ratio_split(stems: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """``train`` / ``val`` / ``all`` stems (each sorted), deterministic in the stems, the fraction and the seed."""
    order = sorted(stems, key=lambda stem: hashlib.sha256(f"{seed}:{stem}".encode()).hexdigest())
    num_val = max(1, round(len(order) * float(val_fraction))) if len(order) > 1 else 0
    val = sorted(order[:num_val])
    return {"train": sorted(order[num_val:]), "val": val, "all": sorted(stems)}


def _read_list(path: Path) -> list[str]:
    """Stems, one a line; an entry written as a file name or path (``images/a.jpg``) counts as its stem."""
    entries = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    return [Path(e).stem if Path(e).suffix.lower() in (*IMAGE_SUFFIXES, ".png") else e for e in entries]


def split_stems(root: Path, options: Mapping[str, Any], split: str, stems: list[str]) -> tuple[list[str], str]:
    """The stems of ``split`` and what decided them (a list file, or the fraction and seed)."""
    splits_dir = root / options["splits"]
    listed = sorted(p.stem for p in splits_dir.glob("*.txt")) if splits_dir.is_dir() else []
    if (splits_dir / f"{split}.txt").is_file():
        return _read_list(splits_dir / f"{split}.txt"), str(splits_dir / f"{split}.txt")
    if listed and split != "all":
        raise DataError(f"split file {splits_dir / (split + '.txt')} does not exist; available splits: "
                        f"{', '.join(listed)} (set data.datamodule.train_split / val_split)")
    if split not in RATIO_SPLITS:
        raise DataError(f"split {split!r} of {root} has no list {splits_dir / (split + '.txt')}; without split "
                        f"lists the folder layout has {', '.join(RATIO_SPLITS)} (data.folder.val_fraction, "
                        "data.folder.split_seed)")
    chosen = ratio_split(stems, options["val_fraction"], int(options["split_seed"]))[split]
    decided = f"data.folder.val_fraction={options['val_fraction']}, split_seed={options['split_seed']}"
    # recorded in the log here; the prepare stage writes it into the prepared data (write_split_lists)
    log.info("split %r of %s: %d of %d images by %s (no split lists in %s)", split, root, len(chosen), len(stems),
             decided, splits_dir)
    return chosen, decided


def write_split_lists(root: str | Path, options: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """Records the ratio split: writes ``<splits>/train.txt`` and ``val.txt`` under ``root`` (each atomically) when
    the dataset has no split lists; returns the lists the dataset now has."""
    root, options = Path(root), folder_options(options)
    splits_dir = root / options["splits"]
    if splits_dir.is_dir() and any(splits_dir.glob("*.txt")):
        return {path.stem: _read_list(path) for path in sorted(splits_dir.glob("*.txt"))}
    split = ratio_split(list(find_pairs(root, options)), options["val_fraction"], int(options["split_seed"]))
    splits_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val"):
        temp = splits_dir / f".{name}.txt.tmp-{os.getpid()}"
        temp.write_text("".join(f"{stem}\n" for stem in split[name]))
        os.replace(temp, splits_dir / f"{name}.txt")
    return {"train": split["train"], "val": split["val"]}


class FolderSegmentation(LabeledImages):
    """A split of an ``images/`` + ``masks/`` folder (see the module's docstring). ``spec.layout_options`` holds
    ``data.folder``'s settings."""

    def __init__(self, root: str | Path, split: str, transform: Callable[..., dict[str, Any]] | None = None,
                 spec: DatasetSpec | None = None) -> None:
        self._bind(root, split, transform, spec, needs="the folder layout needs the dataset's classes")
        if not self.root.is_dir():
            raise DataError(f"dataset root {self.root} does not exist; point data.root at a folder with images/ and "
                            "masks/ (or set data.input to the folder you track with `dvc add` and run `dvc repro "
                            "prepare`)")
        options = folder_options(spec.layout_options)
        pairs = find_pairs(self.root, options)
        stems, self.split_source = split_stems(self.root, options, split, list(pairs))
        missing = [stem for stem in stems if stem not in pairs]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"stem {missing[0]!r} listed in {self.split_source} has no image in "
                            f"{self.root / options['images']}{more}; add it or remove it from the list")
        self._use_samples([pairs[stem] for stem in stems], self.split_source, f"check {self.root}")
