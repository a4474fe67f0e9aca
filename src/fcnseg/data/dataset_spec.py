"""What a dataset is, described once: its name, class names, palette, ignore index, label mapping, layout and source.

Every consumer reads a :class:`DatasetSpec` instead of assuming PASCAL VOC: the loss's and the metrics' ignore
index, metric names, plots, checkpoint and logged-model metadata, the model card, predict's legend and PNG palette,
serving's ``class_pixels``, the promotion gate and lineage. It is built from the ``data`` config
(:func:`dataset_spec`), stored in checkpoints and models (:meth:`DatasetSpec.to_metadata`) and read back
(:meth:`DatasetSpec.from_metadata`).

Label mapping turns the values stored in the dataset's label files into training ids ``0..num_classes-1`` (or the
ignore index): Cityscapes' labelId→trainId table, ADE20K's reduce-zero-label (0 becomes ignored, 1..150 become
0..149). ``num_classes`` follows from the class names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fcnseg.data.classes import IGNORE_INDEX, VOC_CLASSES, voc_palette
from fcnseg.errors import ConfigError

VOID_COLOR = (224, 224, 192)  # the VOC devkit's colour for void; every dataset's ignore index is drawn in it
LAYOUTS = ("voc", "folder", "cityscapes", "ade20k")


def generated_palette(num_classes: int) -> np.ndarray:
    """Distinct colours for ``num_classes`` classes, shape ``(num_classes, 3)`` uint8: the VOC colour map's
    bit-interleaved sequence (the scheme MMSegmentation's and the VOC devkit's maps use), so class 0 is black."""
    if num_classes <= 256:
        return voc_palette(256)[:num_classes].copy()
    rng = np.random.default_rng(0)  # past 256 classes: fixed random colours
    return np.concatenate([voc_palette(256), rng.integers(0, 256, (num_classes - 256, 3), dtype=np.uint8)])


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    class_names: tuple[str, ...]
    palette: np.ndarray = field(repr=False, compare=False)  # (num_classes, 3) uint8, one colour per class
    ignore_index: int = IGNORE_INDEX
    # stored label value -> training id; values absent from it become ignore_index. None: values are training ids.
    label_map: Mapping[int, int] | None = None
    reduce_zero_label: bool = False  # ADE20K: 0 ("other") becomes ignored, v becomes v-1
    layout: str = "voc"
    source: str = "voc"  # where the data came from (voc, synthetic, a DVC-tracked path): lineage and reproduce
    # the layout reader's settings (``data.<layout>``: the folder layout's directories, split fraction and seed)
    layout_options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_voc(self) -> bool:
        return tuple(self.class_names) == VOC_CLASSES

    # -- labels -------------------------------------------------------------------------------------------------

    def label_lut(self, max_value: int = 255) -> np.ndarray | None:
        """A lookup table stored value → training id for values ``0..max_value``, or None when values are already
        training ids (no mapping and no zero reduction)."""
        if self.label_map is None and not self.reduce_zero_label:
            return None
        dtype = np.uint8 if self.ignore_index <= 255 else np.int64
        values = np.arange(max_value + 1)
        if self.label_map is not None:
            lut = np.full(max_value + 1, self.ignore_index, dtype=dtype)
            for raw, train_id in self.label_map.items():
                if 0 <= int(raw) <= max_value:
                    lut[int(raw)] = int(train_id)
        else:
            lut = values.astype(dtype)
        if self.reduce_zero_label:
            reduced = np.where(values == 0, self.ignore_index, lut.astype(np.int64) - 1)
            reduced[values == self.ignore_index] = self.ignore_index  # the ignore value stays ignored
            lut = reduced.astype(dtype)
        return lut

    def encode_labels(self, label: np.ndarray) -> np.ndarray:
        """A label image's stored values → training ids (the ignore index where the mapping says so)."""
        lut = self.label_lut(int(label.max(initial=0)) if label.size else 0)
        return label if lut is None else lut[label]

    def invalid_values(self, label: np.ndarray) -> list[int]:
        """Training-id values of ``label`` that are neither a class nor the ignore index (sorted)."""
        values = np.unique(label)
        return [int(v) for v in values if not (0 <= v < self.num_classes or v == self.ignore_index)]

    # -- colours ------------------------------------------------------------------------------------------------

    def png_palette(self) -> np.ndarray:
        """The 256-entry colour table for paletted (mode P) label PNGs: the classes' colours, the ignore index in
        the void colour, the generated (VOC) map's colours elsewhere, so a VOC model's PNGs carry exactly the VOC
        devkit's colour map; shape ``(256, 3)`` uint8."""
        table = generated_palette(256)
        count = min(self.num_classes, 256)
        table[:count] = self.palette[:count]
        if 0 <= self.ignore_index < 256:
            table[self.ignore_index] = VOID_COLOR
        return table

    def colorize(self, label_map: np.ndarray) -> np.ndarray:
        """``(H, W)`` training ids → ``(H, W, 3)`` uint8 RGB: the classes' colours, ignore in the void colour."""
        table = np.zeros((max(self.num_classes, self.ignore_index + 1, 256), 3), dtype=np.uint8)
        table[: self.num_classes] = self.palette
        if self.ignore_index >= 0:
            table[self.ignore_index] = VOID_COLOR
        return table[np.clip(label_map.astype(np.int64), 0, len(table) - 1)]

    # -- metadata (checkpoints, logged models, MLflow) ----------------------------------------------------------

    def to_metadata(self) -> dict[str, Any]:
        """What a checkpoint or a logged model keeps of the dataset: JSON-serialisable."""
        return {"name": self.name, "class_names": list(self.class_names), "palette": self.palette.tolist(),
                "ignore_index": int(self.ignore_index), "source": self.source, "layout": self.layout,
                # JSON keys are strings: from_metadata turns them back into ints
                "label_map": None if self.label_map is None else {str(k): int(v) for k, v in self.label_map.items()},
                "reduce_zero_label": bool(self.reduce_zero_label), "layout_options": dict(self.layout_options)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None, num_classes: int | None = None,
                      class_names: Sequence[str] | None = None) -> DatasetSpec:
        """The spec a checkpoint or model recorded. Files written before datasets were described carry only class
        names (or a class count): those were VOC models, so VOC's names and palette fill in."""
        metadata = dict(metadata or {})
        names = tuple(metadata.get("class_names") or class_names or
                      (VOC_CLASSES if num_classes in (None, len(VOC_CLASSES)) else
                       [f"class_{i}" for i in range(num_classes)]))
        palette = metadata.get("palette")
        palette = np.asarray(palette, dtype=np.uint8) if palette is not None else generated_palette(len(names))
        default_name = "voc2012" if names == VOC_CLASSES else "unnamed"
        label_map = metadata.get("label_map")
        return cls(name=metadata.get("name", default_name), class_names=names, palette=palette,
                   ignore_index=int(metadata.get("ignore_index", IGNORE_INDEX)),
                   label_map=None if label_map is None else {int(k): int(v) for k, v in dict(label_map).items()},
                   reduce_zero_label=bool(metadata.get("reduce_zero_label", False)),
                   layout=str(metadata.get("layout") or "voc"),
                   source=metadata.get("source", "voc" if names == VOC_CLASSES else "unknown"),
                   layout_options=dict(metadata.get("layout_options") or {}))


def _palette_from_config(value: Any, num_classes: int, name: str) -> np.ndarray:
    if value is None or value == "generated" or value == "voc":  # VOC's palette is the generated map's start
        return generated_palette(num_classes)
    palette = np.asarray(list(value), dtype=np.int64)
    if palette.shape != (num_classes, 3) or palette.min() < 0 or palette.max() > 255:
        raise ConfigError(f"data.palette of dataset {name!r} must list {num_classes} [r, g, b] colours (0..255), "
                          f"one per class name, got shape {tuple(palette.shape)}; or set data.palette=null to "
                          "generate one")
    return palette.astype(np.uint8)


def dataset_spec(data: Mapping[str, Any]) -> DatasetSpec:
    """The spec of a ``data`` config (``cfg.data`` or its resolved dict). ``class_names`` decides the class count:
    a ``num_classes`` that disagrees is refused; with no class names, ``num_classes`` generated names."""
    get = data.get
    name = str(get("name") or "unnamed")
    names = get("class_names")
    num_classes = get("num_classes")
    if names:
        names = tuple(str(n) for n in names)
        if num_classes is not None and int(num_classes) != len(names):
            raise ConfigError(
                f"data.num_classes={num_classes} but data.class_names lists {len(names)} names (dataset {name!r}); "
                "the class count follows from the names: give data.class_names=[...] with one name per class")
        if len(set(names)) != len(names):
            raise ConfigError(f"data.class_names of dataset {name!r} repeats a name; class names must be unique")
    elif num_classes:
        names = tuple(f"class_{i}" for i in range(int(num_classes)))
    else:
        raise ConfigError(f"dataset {name!r} names no classes: set data.class_names=[...] (one name per class)")
    ignore_index = int(get("ignore_index", IGNORE_INDEX) if get("ignore_index") is not None else IGNORE_INDEX)
    if 0 <= ignore_index < len(names):
        raise ConfigError(f"data.ignore_index={ignore_index} is one of the {len(names)} classes of dataset {name!r}; "
                          "use a value outside 0..num_classes-1 (255 for uint8 labels)")
    label_map = get("label_map")
    if label_map is not None:
        label_map = {int(k): int(v) for k, v in dict(label_map).items()}
        bad = sorted(v for v in label_map.values() if not (0 <= v < len(names) or v == ignore_index))
        if bad:
            raise ConfigError(f"data.label_map of dataset {name!r} maps to {bad[:5]}, outside classes "
                              f"0..{len(names) - 1} and ignore {ignore_index}: fix the map or the class names")
    layout = str(get("layout") or "voc")
    if layout not in LAYOUTS:
        raise ConfigError(f"data.layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    options = get(layout)  # data.folder for the folder layout; VOC's settings are keys of their own
    options = {str(k): v for k, v in dict(options).items()} if isinstance(options, Mapping) else {}
    return DatasetSpec(name=name, class_names=names, palette=_palette_from_config(get("palette"), len(names), name),
                       ignore_index=ignore_index, label_map=label_map,
                       reduce_zero_label=bool(get("reduce_zero_label") or False), layout=layout,
                       source=str(get("source") or "unknown"), layout_options=options)
