"""A deterministic synthetic dataset written in the exact PASCAL VOC layout, for the offline quick start and tests.

Every one of the 20 foreground classes is a family of objects with its own colour, texture and body shape, plus
thin parts (legs, bars a few pixels wide) that a stride-32 score map cannot resolve but the pool3/pool4 skips can.
Objects overlap (later ones occlude earlier ones) on a textured background with low-saturation clutter that is
labelled background. Labels are palette PNGs with a void (255) band along every object boundary, as in VOC, so the
ordinary VOC reader, transforms and metrics run unchanged.

Layout written under ``root`` (a ``VOC2012`` directory)::

    JPEGImages/<id>.jpg  SegmentationClass/<id>.png  ImageSets/Segmentation/{train,val,trainval,test}.txt  .complete

The ``test`` split (``num_test`` images, drawn after train and val from the same distribution) is held out: the
generator's difficulty was calibrated on val and checkpoints are selected on val, so only test gives a figure that
nothing was tuned on. Adding test images leaves the train and val images unchanged (sample i depends on (seed, i)).
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fcnseg.data.classes import IGNORE_INDEX, NUM_CLASSES
from fcnseg.data.voc import COMPLETE_MARKER, save_label_png
from fcnseg.errors import DataError

GENERATOR_VERSION = 1  # bump when the drawing code changes, so stale datasets on disk are rewritten
JPEG_QUALITY = 95

_TEXTURES = ("solid", "hstripes", "vstripes", "diagonal", "checker", "dots")
_SHAPES = ("ellipse", "rectangle", "triangle", "pentagon")


@dataclass(frozen=True)
class ClassStyle:
    """How objects of one class look: the cues a network can learn them by."""

    color: tuple[int, int, int]
    texture: str
    period: int  # texture period in pixels
    shape: str
    legs: tuple[int, int]  # min/max number of thin parts


def class_styles() -> dict[int, ClassStyle]:
    """Fixed (seed-independent) looks of classes 1..20: 10 hues x 2 brightness levels, 6 textures, 4 shapes."""
    styles = {}
    for c in range(1, NUM_CLASSES):
        k = c - 1
        hue = (k % 10) / 10.0
        value = 0.95 if k < 10 else 0.6
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
        styles[c] = ClassStyle(
            color=(int(r * 255), int(g * 255), int(b * 255)),
            texture=_TEXTURES[k % len(_TEXTURES)],
            period=4 + (k % 3) * 2,
            shape=_SHAPES[(k // 2) % len(_SHAPES)],
            legs=(0, 2) if k % 2 else (2, 4),
        )
    return styles


@dataclass(frozen=True)
class SyntheticParams:
    seed: int = 0
    num_train: int = 400
    num_val: int = 100
    num_test: int = 0
    height: int = 96
    width: int = 96
    objects: tuple[int, int] = (2, 4)  # min/max objects per image
    object_size: tuple[float, float] = (0.25, 0.5)  # body size as a fraction of the shorter image side
    clutter: tuple[int, int] = (2, 6)  # min/max background distractors per image
    noise_std: float = 6.0  # per-pixel Gaussian noise (0-255 scale)
    color_jitter: float = 12.0  # per-object colour offset std (0-255 scale)
    void_width: int = 1  # void pixels on each side of a boundary


def _texture(style: ClassStyle, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Float HxW modulation in [0, 1] (1 = class colour, 0 = its dark shade) with a random phase."""
    yy, xx = np.mgrid[0:h, 0:w]
    yy = yy + rng.integers(style.period)
    xx = xx + rng.integers(style.period)
    p = style.period
    half = p // 2
    if style.texture == "solid":
        return np.ones((h, w))
    if style.texture == "hstripes":
        return (yy % p < half).astype(float)
    if style.texture == "vstripes":
        return (xx % p < half).astype(float)
    if style.texture == "diagonal":
        return ((xx + yy) % p < half).astype(float)
    if style.texture == "checker":
        return (((xx // half) + (yy // half)) % 2).astype(float)
    return ~(((xx % p) < half) & ((yy % p) < half)) * 1.0  # dots


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random grid upsampled bilinearly (background texture)."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((w, h), Image.BILINEAR), dtype=np.float64) / 255.0


def _body_polygon(shape: str, cx: float, cy: float, rx: float, ry: float, angle: float) -> list[tuple[float, float]]:
    if shape == "rectangle":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        corners = [(0, -1), (1, 1), (-1, 1)]
    elif shape == "pentagon":
        corners = [(np.cos(a), np.sin(a)) for a in np.linspace(-np.pi / 2, 1.5 * np.pi, 5, endpoint=False)]
    else:  # ellipse as a 24-gon, so it can be rotated like the others
        corners = [(np.cos(a), np.sin(a)) for a in np.linspace(0, 2 * np.pi, 24, endpoint=False)]
    ca, sa = np.cos(angle), np.sin(angle)
    return [(cx + ca * x * rx - sa * y * ry, cy + sa * x * rx + ca * y * ry) for x, y in corners]


def _object_mask(style: ClassStyle, p: SyntheticParams, rng: np.random.Generator) -> np.ndarray:
    """Boolean HxW mask of one object: a body plus thin straight parts (legs, antennas) sticking out of it."""
    h, w = p.height, p.width
    side = min(h, w)
    size = rng.uniform(*p.object_size) * side
    rx, ry = size / 2 * rng.uniform(0.7, 1.3, size=2)
    cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    canvas = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon(_body_polygon(style.shape, cx, cy, rx, ry, rng.uniform(0, np.pi)), fill=1)
    for _ in range(rng.integers(style.legs[0], style.legs[1] + 1)):
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.5, 1.0) * size
        x0, y0 = cx + np.cos(angle) * rx * 0.5, cy + np.sin(angle) * ry * 0.5
        x1, y1 = x0 + np.cos(angle) * (length + rx * 0.5), y0 + np.sin(angle) * (length + ry * 0.5)
        draw.line([(x0, y0), (x1, y1)], fill=1, width=int(rng.integers(3, 6)))
    return np.asarray(canvas, dtype=bool)


def _draw_clutter(image: np.ndarray, p: SyntheticParams, rng: np.random.Generator) -> None:
    """Low-saturation distractor shapes and lines, labelled background."""
    h, w = p.height, p.width
    for _ in range(rng.integers(p.clutter[0], p.clutter[1] + 1)):
        canvas = Image.new("1", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.15) * min(h, w)
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=1)
        else:
            draw.line([(x - r, y - r * rng.uniform(-1, 1)), (x + r, y + r)], fill=1, width=int(rng.integers(2, 5)))
        grey = rng.uniform(40, 220)
        tint = rng.normal(0, 12, size=3)
        image[np.asarray(canvas, dtype=bool)] = np.clip(grey + tint, 0, 255)


def _void_band(label: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of a label change (both sides), like the hand-drawn VOC outlines."""
    edge = np.zeros(label.shape, dtype=bool)
    dy = label[1:, :] != label[:-1, :]
    dx = label[:, 1:] != label[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    band = edge
    for _ in range(width - 1):  # grow by one pixel (4-neighbourhood) per extra step
        grown = band.copy()
        grown[1:, :] |= band[:-1, :]
        grown[:-1, :] |= band[1:, :]
        grown[:, 1:] |= band[:, :-1]
        grown[:, :-1] |= band[:, 1:]
        band = grown
    return band


def render_sample(p: SyntheticParams, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 HxWx3, label uint8 HxW) pair; depends only on (seed, index) and the drawing parameters."""
    rng = np.random.default_rng([p.seed, index])
    h, w = p.height, p.width
    styles = class_styles()

    # Background: a random dull base colour, low-frequency blotches and fine grain.
    # Mostly grey, only slightly tinted, so that saturated colour stays a cue for objects.
    base = rng.uniform(60, 190) + rng.normal(0, 15, size=3)
    blotches = _smooth_noise(h, w, int(rng.integers(3, 8)), rng)[..., None]
    blotches = blotches * (rng.normal(0, 50) + rng.normal(0, 10, size=3))
    image = np.clip(base + blotches, 0, 255)
    _draw_clutter(image, p, rng)
    label = np.zeros((h, w), dtype=np.uint8)

    for _ in range(rng.integers(p.objects[0], p.objects[1] + 1)):
        cls = int(rng.integers(1, NUM_CLASSES))
        style = styles[cls]
        mask = _object_mask(style, p, rng)
        color = np.asarray(style.color, dtype=np.float64) + rng.normal(0, p.color_jitter, size=3)
        shade = _texture(style, h, w, rng)[..., None]
        # Textured regions alternate between the colour and a darker shade of it; the shade stays brighter than
        # the dark-colour classes, so colour alone separates classes and texture confirms it.
        pixels = color * (0.75 + 0.25 * shade)
        image[mask] = pixels[mask]
        label[mask] = cls  # drawn in order: later objects occlude earlier ones

    image = np.clip(image + rng.normal(0, p.noise_std, size=image.shape), 0, 255).astype(np.uint8)
    label[_void_band(label, p.void_width)] = IGNORE_INDEX
    return image, label


def _content_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(q for q in root.rglob("*") if q.is_file() and q.name != COMPLETE_MARKER):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _marker_params(params: SyntheticParams) -> dict:
    return {"generator_version": GENERATOR_VERSION, "jpeg_quality": JPEG_QUALITY, **asdict(params)}


def _is_complete(root: Path, expected: dict) -> bool:
    try:
        marker = json.loads((root / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("params") == json.loads(json.dumps(expected))


def _write_all(tmp: Path, p: SyntheticParams) -> None:
    images, labels = tmp / "JPEGImages", tmp / "SegmentationClass"
    sets = tmp / "ImageSets" / "Segmentation"
    for d in (images, labels, sets):
        d.mkdir(parents=True)
    ids: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for index in range(p.num_train + p.num_val + p.num_test):
        split = "train" if index < p.num_train else "val" if index < p.num_train + p.num_val else "test"
        image_id = f"synth_{index:06d}"
        image, label = render_sample(p, index)
        Image.fromarray(image, mode="RGB").save(images / f"{image_id}.jpg", quality=JPEG_QUALITY)
        save_label_png(label, labels / f"{image_id}.png")
        ids[split].append(image_id)
    for split, names in (*ids.items(), ("trainval", ids["train"] + ids["val"])):
        if names or split != "test":
            (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def write_synthetic_voc(
    root: str | os.PathLike,
    seed: int = 0,
    num_train: int = 400,
    num_val: int = 100,
    height: int = 96,
    width: int = 96,
    num_test: int = 0,
    **drawing: object,
) -> Path:
    """Write the synthetic dataset in the VOC layout under ``root`` (a ``VOC2012`` directory) and return it.

    Deterministic: the same arguments give byte-identical files. Atomic: the dataset is written to a temporary
    sibling directory and renamed into place with its ``.complete`` marker (parameters + content hash) already
    inside, so ``root`` is never half-written. Returns at once if ``root`` is complete with the same parameters;
    with other parameters it is replaced. ``drawing`` overrides other ``SyntheticParams`` fields (difficulty).
    ``num_test`` > 0 adds a held-out ``test`` split (``ImageSets/Segmentation/test.txt``).
    """
    sizes = {"num_train": (num_train, 1), "num_val": (num_val, 1), "num_test": (num_test, 0), "height": (height, 8),
             "width": (width, 8)}
    for name, (value, minimum) in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DataError(
                f"synthetic data: {name} must be an integer >= {minimum}, got {value!r}; fix data.synthetic.{name}"
            )
    try:
        drawing = {k: tuple(v) if isinstance(v, list) else v for k, v in drawing.items()}
        params = SyntheticParams(seed=int(seed), num_train=num_train, num_val=num_val, num_test=num_test,
                                 height=height, width=width, **drawing)  # type: ignore[arg-type]
    except TypeError as err:
        raise DataError(f"synthetic data: {err}; check the keys under data.synthetic") from None

    root = Path(root)
    expected = _marker_params(params)
    if _is_complete(root, expected):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    old = None
    try:
        _write_all(tmp, params)
        marker = {"params": expected, "sha256": _content_hash(tmp)}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if root.exists() or root.is_symlink():
            # Move the stale dataset aside first: rename is atomic, deleting a tree is not.
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / root.name)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return root


__all__ = ["ClassStyle", "SyntheticParams", "class_styles", "render_sample", "write_synthetic_voc"]
