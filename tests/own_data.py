"""Writes tiny datasets in the folder, Cityscapes and ADE20K layouts, for tests of "your own data" (issue 20).

Every writer returns an :class:`OwnData`: the root to point ``data.root`` at, the class names, the Hydra / ``dvc exp
run -S`` overrides that select it, its split ids, and per image the training-id label the reader must yield after
the dataset's label mapping (255 = ignored). Images are small and not square (32x32 to 48x40); each image's pixels
are its classes' palette colours plus noise, so a tiny net can learn them. Labels hold every class of the dataset
across the images (150 for ADE20K), and an ignore band.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from fcnseg.data.dataset_spec import generated_palette

ROOT = Path(__file__).resolve().parents[1]
IGNORE = 255
# (height, width): non-square, portrait and landscape, all between 32x32 and 48x40 (H x W)
SIZES = [(32, 40), (40, 32), (36, 44), (48, 40), (32, 32), (44, 36)]
BLOCK = 8  # labels are 8x8 blocks, each of one class, so each image holds many classes

# The official Cityscapes table (cityscapesscripts/helpers/labels.py): labelId -> trainId of the 19 training classes.
# Written out here, independently of conf/data/cityscapes.yaml, so a wrong map in the config fails the tests.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]
# Tiny sizes for a training run on these datasets (the data keys every layout config has).
TINY_DATAMODULE = [
    "data.datamodule.train_transform.crop_size=32",
    "data.datamodule.batch_size=2",
    "data.datamodule.val_batch_size=2",
    "data.datamodule.num_workers=0",
    "model.net.width=0.0625",
]


@dataclass
class OwnData:
    root: Path  # what data.root points at
    layout: str  # folder, cityscapes, ade20k
    class_names: list[str]
    overrides: list[str]  # data=<layout> data.root=... (+ data.class_names for the folder layout)
    splits: dict[str, list[str]]  # split name (as the reader names it) -> image ids
    labels: dict[str, np.ndarray] = field(repr=False)  # image id -> expected training ids (255 = ignored)
    images: dict[str, Path] = field(repr=False, default_factory=dict)  # image id -> image file
    masks: dict[str, Path] = field(repr=False, default_factory=dict)  # image id -> label file as stored

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_split(self) -> str:
        return next(iter(self.splits))

    @property
    def val_split(self) -> str:
        return list(self.splits)[1]


def config_class_names(layout: str) -> list[str]:
    """The class names conf/data/<layout>.yaml lists."""
    return list(yaml.safe_load((ROOT / "conf" / "data" / f"{layout}.yaml").read_text())["class_names"])


def train_ids(num_classes: int, index: int, size: tuple[int, int]) -> np.ndarray:
    """Training ids of image ``index``: 8x8 blocks cycling through the classes (image ``index`` starts where image
    ``index - 1`` stopped, so a few images hold every class), and an ignore band across the middle."""
    height, width = size
    rows, cols = -(-height // BLOCK), -(-width // BLOCK)
    per_image = rows * cols
    blocks = (np.arange(per_image) + index * per_image) % num_classes
    label = np.kron(blocks.reshape(rows, cols), np.ones((BLOCK, BLOCK), dtype=np.int64))[:height, :width]
    label = label.astype(np.uint8)
    label[height // 2, :] = IGNORE
    return label


def image_for(label: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """RGB image whose pixels are their class's palette colour plus noise (ignored pixels: grey)."""
    palette = np.concatenate([generated_palette(num_classes).astype(np.int64), np.full((1, 3), 128)])
    colours = palette[np.where(label == IGNORE, num_classes, label)]
    noise = rng.integers(-12, 13, size=colours.shape)
    return np.clip(colours + noise, 0, 255).astype(np.uint8)


def save_mask(values: np.ndarray, path: Path, mode: str = "P") -> Path:
    """A label PNG: mode ``P`` (index + palette, as VOC and most tools write) or ``L`` (8-bit grey)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    png = Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "P":  # putpalette turns L into P and keeps the values (the indices)
        png.putpalette(generated_palette(256).ravel().tolist())
    png.save(path)
    return path


def _save_image(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="RGB").save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def _names_list(names: list[str]) -> str:
    return "[" + ",".join(names) + "]"


def write_folder_dataset(root: str | Path, class_names: list[str] | None = None, *, num_classes: int = 3,
                         num_train: int = 4, num_val: int = 2, split_files: bool = True, mask_mode: str = "P",
                         image_suffix: str = ".jpg", seed: int = 0) -> OwnData:
    """The folder layout: ``images/<stem>.jpg`` + ``masks/<stem>.png`` (values are class ids, 255 ignored), and
    with ``split_files`` ``splits/train.txt`` + ``splits/val.txt`` (one stem per line). Without them the reader splits
    by ``data.folder.val_fraction`` and ``data.folder.split_seed``; ``splits`` then holds all stems under ``"all"``."""
    root = Path(root)
    names = list(class_names) if class_names else (["background", "road", "car"] if num_classes == 3 else
                                                     [f"thing{i}" for i in range(num_classes)])
    rng = np.random.default_rng(seed)
    data = OwnData(root, "folder", names, ["data=folder", f"data.root={root}", f"data.class_names={_names_list(names)}"],
                   {}, {})
    stems = {"train": [f"scene_{i:03d}" for i in range(num_train)],
             "val": [f"scene_{num_train + i:03d}" for i in range(num_val)]}
    for index, stem in enumerate(stems["train"] + stems["val"]):
        label = train_ids(len(names), index, SIZES[index % len(SIZES)])
        data.labels[stem] = label
        data.images[stem] = _save_image(image_for(label, len(names), rng), root / "images" / f"{stem}{image_suffix}")
        data.masks[stem] = save_mask(label, root / "masks" / f"{stem}.png", mask_mode)
    if split_files:
        (root / "splits").mkdir(parents=True, exist_ok=True)
        for split, ids in stems.items():
            (root / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        data.splits = stems
    else:
        data.splits = {"all": stems["train"] + stems["val"]}
    return data


def write_cityscapes_dataset(root: str | Path, *, num_train: int = 3, num_val: int = 2, seed: int = 0) -> OwnData:
    """Cityscapes: ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
    ``gtFine/<split>/<city>/…_gtFine_labelIds.png`` holding labelIds (mode L, as the official files), including
    labelIds that are not training classes (0 unlabeled, 4 static, 9 parking, 29 caravan: all ignored)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    data = OwnData(root, "cityscapes", list(CITYSCAPES_CLASSES), ["data=cityscapes", f"data.root={root}"],
                   {"train": [], "val": []}, {})
    to_label_id = {train: label for label, train in CITYSCAPES_TRAIN_IDS.items()}
    index = 0
    for split, count, city in (("train", num_train, "aachen"), ("val", num_val, "frankfurt")):
        for frame in range(count):
            stem = f"{city}_{index:06d}_{frame:06d}"
            expected = train_ids(len(CITYSCAPES_CLASSES), index, SIZES[index % len(SIZES)])
            stored = np.vectorize(lambda v: to_label_id.get(int(v), 0))(expected).astype(np.uint8)
            # labelIds outside the 19 training classes: stored, and ignored after mapping
            for label_id in (4, 9, 29):
                stored[-1, label_id % stored.shape[1]] = label_id
                expected = expected.copy()
                expected[-1, label_id % stored.shape[1]] = IGNORE
            data.labels[stem] = expected
            data.splits[split].append(stem)
            data.images[stem] = _save_image(image_for(expected, 19, rng),
                                            root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            data.masks[stem] = save_mask(stored, root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", "L")
            index += 1
    return data


def write_ade20k_dataset(root: str | Path, *, num_train: int = 5, num_val: int = 2, seed: int = 0) -> OwnData:
    """ADE20K (SceneParsing): ``<root>/images/{training,validation}/ADE_*.jpg`` and
    ``<root>/annotations/{training,validation}/ADE_*.png`` (mode L): 0 = "other" (ignored), 1..150 = classes 0..149.
    ``root`` is the ``ADEChallengeData2016`` directory. The training images hold all 150 classes."""
    root = Path(root)
    names = config_class_names("ade20k")
    rng = np.random.default_rng(seed)
    data = OwnData(root, "ade20k", names, ["data=ade20k", f"data.root={root}"], {"training": [], "validation": []},
                   {})
    index = 0
    for split, count, prefix in (("training", num_train, "ADE_train"), ("validation", num_val, "ADE_val")):
        for _ in range(count):
            stem = f"{prefix}_{index + 1:08d}"
            expected = train_ids(len(names), index, SIZES[3])  # 48x40: 30 blocks, 5 images hold all 150 classes
            stored = np.where(expected == IGNORE, 0, expected.astype(np.int64) + 1).astype(np.uint8)
            data.labels[stem] = expected
            data.splits[split].append(stem)
            data.images[stem] = _save_image(image_for(expected, len(names), rng), root / "images" / split / f"{stem}.jpg")
            data.masks[stem] = save_mask(stored, root / "annotations" / split / f"{stem}.png", "L")
            index += 1
    return data
