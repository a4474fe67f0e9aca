"""Segment image files: a palette-PNG label map (the model's dataset's colours) and an overlay PNG (with a legend
of the dataset's class names) for each image.

Used by ``fcnseg predict``. An unreadable file is reported by name and skipped; the rest carry on.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fcnseg.data.dataset_spec import DatasetSpec
from fcnseg.data.voc import save_label_png
from fcnseg.errors import DataError
from fcnseg.inference import Segmenter, read_image, segmenter_dataset
from fcnseg.viz import overlay

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class PredictSummary:
    written: list[tuple[Path, Path]] = field(default_factory=list)  # (label map, overlay) per segmented image
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)


def link_problem(path: Path) -> str | None:
    """Why a symbolic link cannot be read (a loop, a missing target), or None when it is not a dead link."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: symbolic link loop (it points back to itself)"
        return f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)"
    return None


def check_writable(out_dir: str | Path) -> Path:
    """A DataError in one line unless ``out_dir`` can be created and written (probed with a temporary directory
    in it, or in its nearest existing parent, removed at once), so an unwritable ``--out`` is found before the
    model loads; creates nothing."""
    out_dir = Path(out_dir)
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists() or p.is_symlink())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is not a directory")
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".fcnseg-write-test-"))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DataError(f"--out {out_dir}: cannot write there ({existing} {reason.lower()}); pass a writable "
                        f"directory with --out") from None
    return out_dir


def collect_inputs(inputs: list[str | Path], exclude: Path | None = None,
                   unreadable: list[tuple[Path, str]] | None = None) -> list[tuple[Path, Path]]:
    """(file, output stem relative to the output dir) for each file given or image file found in a directory.

    Broken and looping symbolic links (given by name, or in a directory with an image suffix or none) go to
    ``unreadable`` as (path, reason), to be reported like other unreadable files; without that list they are an
    error.

    Files under ``exclude`` (the output dir) are left out, so a re-run does not segment its own outputs. Two
    inputs that would write the same output (``a.jpg`` and ``a.png``, or ``x/a.jpg`` and ``y/a.jpg`` given by
    name) keep their extension, then a counter, in the output name instead of overwriting each other.
    """
    excluded = exclude.resolve() if exclude is not None else None
    found: list[tuple[Path, Path]] = []
    dead: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            entries = sorted(item.rglob("*"))
            files = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                     and not (excluded and excluded in p.resolve().parents)]
            found += [(p, p.relative_to(item).with_suffix("")) for p in files]
            dead += [(p, problem) for p in entries if p.suffix.lower() in IMAGE_SUFFIXES | {""}
                     and (problem := link_problem(p))]
        elif item.exists():
            found.append((item, Path(item.stem)))  # given by name: always tried, whatever its suffix
        elif problem := link_problem(item):
            dead.append((item, problem))
        else:
            raise DataError(f"{item}: no such file or directory")
    if dead and unreadable is None:
        raise DataError(dead[0][1])
    if unreadable is not None:
        unreadable += dead
    if not found and not dead:
        raise DataError(f"no image files in {', '.join(map(str, inputs))} "
                        f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    counts: dict[Path, int] = {}
    for _, stem in found:
        counts[stem] = counts.get(stem, 0) + 1
    taken: set[Path] = set()
    unique: list[tuple[Path, Path]] = []
    for path, stem in found:
        if counts[stem] > 1:
            stem = stem.with_name(f"{stem.name}_{path.suffix.lstrip('.').lower() or 'noext'}")
            base, number = stem, 2
            while stem in taken:
                stem, number = base.with_name(f"{base.name}_{number}"), number + 1
        taken.add(stem)
        unique.append((path, stem))
    return unique


def write_outputs(image: np.ndarray, label_map: np.ndarray, stem: Path, out_dir: Path,
                  class_names: list[str], dataset: DatasetSpec | None = None) -> tuple[Path, Path]:
    mask_path = out_dir / stem.parent / f"{stem.name}.png"  # not with_suffix: "a.b" stays "a.b"
    overlay_path = out_dir / stem.parent / f"{stem.name}_overlay.png"
    try:
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        save_label_png(label_map, mask_path, palette=None if dataset is None else dataset.png_palette())
        Image.fromarray(overlay(image, label_map, class_names=class_names, dataset=dataset)).save(overlay_path)
    except OSError as exc:  # the disk filled up, the directory went away: one line, not a thread's traceback
        raise DataError(f"cannot write {mask_path} ({exc.strerror or type(exc).__name__}); "
                        f"check the space and permissions of --out") from None
    return mask_path, overlay_path


def _read(path: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        return read_image(path), None
    except DataError as exc:
        return None, str(exc)


def predict_files(inputs: list[str | Path], segmenter: Segmenter, out_dir: str | Path, batch_size: int = 8,
                  tile_size: int | None = None, progress: bool | None = None,
                  io_threads: int | None = None) -> PredictSummary:
    """Segments every input image, ``batch_size`` files at a time.

    Decoding and PNG encoding run in ``io_threads`` threads (default: up to 8, one per core; PIL releases the GIL)
    while the model runs: the next batch is read and the previous one written during the forward pass, so the
    accelerator is not left waiting on the CPU. At most one batch ahead is read and two behind are pending, so
    memory stays bounded. Outputs and messages come in input order.
    """
    out_dir = check_writable(out_dir)
    dataset = segmenter_dataset(segmenter)
    summary = PredictSummary()
    files = collect_inputs(inputs, exclude=out_dir, unreadable=summary.skipped)
    for _, reason in summary.skipped:
        print(f"error: {reason}; skipped", file=sys.stderr)
    show = progress if progress is not None else len(files) > 1
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not show, file=sys.stderr)
    workers = io_threads or max(1, min(8, os.cpu_count() or 1))
    pending: deque = deque()  # futures of write_outputs, oldest first

    def finish_writes(keep: int) -> None:
        while len(pending) > keep:
            summary.written.append(pending.popleft().result())
            bar.update(1)

    with ThreadPoolExecutor(workers, thread_name_prefix="fcnseg-io") as pool:
        def read_batch(start: int) -> list:
            return [pool.submit(_read, path) for path, _ in files[start : start + batch_size]]

        reads = read_batch(0)
        for start in range(0, len(files), batch_size):
            results = [future.result() for future in reads]
            reads = read_batch(start + batch_size)  # the next batch decodes while this one runs
            chunk: list[tuple[Path, np.ndarray]] = []
            for (path, stem), (image, error) in zip(files[start : start + batch_size], results):
                if error is not None:
                    finish_writes(0)  # messages in input order
                    summary.skipped.append((path, error))
                    # through tqdm, so the message is a line of its own, not glued to the progress bar
                    tqdm.write(f"error: {error}; skipped", file=sys.stderr)
                    bar.update(1)
                else:
                    chunk.append((stem, image))
            # whole images share batches; those larger than tile_size go window by window
            whole = [i for i, (_, image) in enumerate(chunk) if not (tile_size and max(image.shape[:2]) > tile_size)]
            label_maps = dict(zip(whole, segmenter.predict_many([chunk[i][1] for i in whole], batch_size)))
            for i, (stem, image) in enumerate(chunk):
                label_map = label_maps[i] if i in label_maps else segmenter.predict_sliding(image, tile_size)
                pending.append(pool.submit(write_outputs, image, label_map, stem, out_dir, segmenter.class_names,
                                           dataset))
            finish_writes(2 * batch_size)
        finish_writes(0)
    bar.close()
    return summary
