"""Fuzzing the image/label readers: random and truncated bytes, every image mode, wrong sizes. Each case must end
in a valid sample or the project's own one-line DataError naming the file; never another exception, never a
crash or hang of DataLoader workers."""

from __future__ import annotations

import io
import multiprocessing
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fcnseg.data.classes import IGNORE_INDEX, NUM_CLASSES
from fcnseg.data.voc import VOCSegmentation, read_dataset_image, read_label
from fcnseg.errors import DataError
from tests.voc_layout import random_sample, save_palette_png, write_voc_layout

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr"]
NOT_IN_PNG = ("CMYK", "F", "YCbCr", "I")  # written as TIFF behind the .jpg/.png name: readers go by content


def png_bytes(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


def image_in_mode(rng: np.random.Generator, mode: str, height: int, width: int) -> Image.Image:
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")
    return rgb.convert(mode) if mode not in ("I;16",) else rgb.convert("L").convert("I;16")


def assert_data_error_or(call, names: tuple[str, ...], check) -> None:
    try:
        result = call()
    except DataError as err:
        message = str(err)
        assert "\n" not in message and any(name in message for name in names), message
        return
    check(result)


def check_image(image: np.ndarray) -> None:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def check_label(label: np.ndarray) -> None:
    assert label.dtype == np.uint8 and label.ndim == 2


def write_and_read(payload: bytes, suffix: str, reader, check) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"2007_000001{suffix}"
        path.write_bytes(payload)
        assert_data_error_or(lambda: reader(path), (path.name,), check)


@FUZZ
@given(payload=st.binary(max_size=4096), suffix=st.sampled_from([".jpg", ".png"]))
def test_random_bytes(payload, suffix):
    write_and_read(payload, suffix, read_dataset_image, check_image)
    write_and_read(payload, suffix, read_label, check_label)


@FUZZ
@given(seed=st.integers(0, 2**16), cut=st.floats(0, 1), flips=st.lists(st.integers(0, 10**6), max_size=8),
       fmt=st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF"]))
def test_truncated_and_bit_flipped_files(seed, cut, flips, fmt):
    rng = np.random.default_rng(seed)
    image, label = random_sample(rng, int(rng.integers(2, 40)), int(rng.integers(2, 40)))
    for payload, reader, check in ((png_bytes(image, "RGB", fmt), read_dataset_image, check_image),
                                   (png_bytes(label, "L", fmt if fmt != "JPEG" else "PNG"), read_label, check_label)):
        damaged = bytearray(payload[: int(len(payload) * cut)])
        for flip in flips:
            if damaged:
                damaged[flip % len(damaged)] ^= 0xFF
        write_and_read(bytes(damaged), ".png", reader, check)


@FUZZ
@given(seed=st.integers(0, 2**16), image_mode=st.sampled_from(MODES), label_mode=st.sampled_from(MODES),
       size=st.tuples(st.integers(1, 24), st.integers(1, 24)), label_size=st.tuples(st.integers(1, 24),
                                                                                      st.integers(1, 24)))
def test_any_mode_and_size_through_the_dataset(seed, image_mode, label_mode, size, label_size):
    """Whatever the modes and sizes, an item is a valid sample (RGB image, label of its size holding classes or
    void) or a DataError naming the file."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_voc_layout(Path(tmp) / "VOC2012", {"a": random_sample(rng, 8, 8)}, {"train": ["a"]})
        fmt = "TIFF" if image_mode in NOT_IN_PNG else "PNG"
        image_in_mode(rng, image_mode, *size).save(root / "JPEGImages" / "a.jpg", format=fmt)
        label_fmt = "TIFF" if label_mode in NOT_IN_PNG else "PNG"
        image_in_mode(rng, label_mode, *label_size).save(root / "SegmentationClass" / "a.png", format=label_fmt)
        dataset = VOCSegmentation(root, "train")

        def check(item):
            image, label = item
            check_image(image)
            check_label(label)
            assert label.shape == image.shape[:2]
            assert set(np.unique(label).tolist()) <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}

        assert_data_error_or(lambda: dataset[0], ("a.jpg", "a.png"), check)


def test_bad_files_behind_dataloader_workers_raise_the_data_error(tmp_path):
    """Worker processes hit a truncated label and a junk image: the loader ends promptly with the DataError."""
    import torch

    rng = np.random.default_rng(0)
    samples = {f"img{i}": random_sample(rng, 16, 16) for i in range(8)}
    root = write_voc_layout(tmp_path / "VOC2012", samples, {"train": list(samples)})
    label = root / "SegmentationClass" / "img5.png"
    label.write_bytes(label.read_bytes()[:40])
    (root / "JPEGImages" / "img6.jpg").write_bytes(b"\x00" * 100)
    loader = torch.utils.data.DataLoader(VOCSegmentation(root, "train"), batch_size=2, num_workers=2, timeout=60)
    batches = iter(loader)
    try:
        with pytest.raises(DataError, match="img[56]") as info:
            list(batches)
    finally:
        # The traceback keeps the iterator alive in a reference cycle; left to the garbage collector, its shutdown
        # takes 2 x 5 s of worker joins in whatever thread happens to collect (once: a later test's HTTP server).
        batches._shutdown_workers()
    assert not multiprocessing.active_children(), "loader workers outlived the error"
    # torch re-raises it with the worker's traceback appended; what the user is shown is the one line
    from fcnseg.cli_errors import user_message

    shown = user_message(info.value)
    assert "\n" not in shown and shown.startswith(("cannot read label", "cannot read image")), shown


def test_a_valid_palette_label_survives_the_round_trip(tmp_path):
    """The fuzz oracle's other half: a well-formed label reads back exactly."""
    label = np.random.default_rng(1).integers(0, NUM_CLASSES, (9, 13), dtype=np.uint8)
    label[0] = IGNORE_INDEX
    save_palette_png(label, tmp_path / "x.png")
    assert np.array_equal(read_label(tmp_path / "x.png"), label)
