"""The inference runtime: chosen by device and CPU features (``--runtime auto``), and each path's label maps agree
with PyTorch fp32 eager on >= 99.9% of pixels (bf16 + channels_last: tests/test_inference.py, on the VOC photo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fcnseg import inference, runtime
from fcnseg.export import OnnxRuntimeSegmenter
from fcnseg.inference import Segmenter
from tests.test_inference import noise_image, single_thread, tiny_net  # noqa: F401
from tests.test_predict_cli import assert_label_png, run_predict
from tests.test_inference import write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("flags, device, expected", [
    ({"avx2", "amx_bf16", "amx_tile"}, "cpu", "torch"), ({"avx2", "avx512f", "avx512_bf16"}, "cpu", "torch"),
    ({"avx2", "fma"}, "cpu", "onnx"), (set(), "cuda", "torch")])
def test_auto_runtime_follows_the_cpu_features(monkeypatch: pytest.MonkeyPatch, flags: set, device: str,
                                               expected: str) -> None:
    monkeypatch.setattr(inference, "cpu_flags", lambda: flags)
    assert runtime.choose_runtime("auto", torch.device(device)) == expected
    assert runtime.choose_runtime("torch", torch.device(device)) == "torch"
    if device == "cpu":
        monkeypatch.delenv(inference.PRECISION_ENV, raising=False)
        segmenter = Segmenter(tiny_net(), "imagenet", device="cpu")
        native = expected == "torch"
        assert (segmenter.precision, segmenter.channels_last) == (("bf16", True) if native else ("fp32", False))


def test_the_real_cpu_flags_are_read() -> None:
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo")
    assert {"fpu", "sse2"} <= inference.cpu_flags()


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def test_onnxruntime_segmenter_agrees_with_pytorch_whole_batched_and_sliding() -> None:
    torch_model = Segmenter(tiny_net(), "imagenet", device="cpu", precision="fp32")
    onnx_model = OnnxRuntimeSegmenter(Segmenter(tiny_net(), "imagenet", device="cpu"), threads=1)
    assert onnx_model.parity.ok
    images = [noise_image(30, 40, 1), noise_image(30, 40, 2), noise_image(17, 9, 3)]
    for got, want in zip(onnx_model.predict_many(images, batch_size=2), torch_model.predict_many(images)):
        assert agreement(got, want) >= 0.999
    large = noise_image(70, 90, 4)
    assert agreement(onnx_model.predict_sliding(large, 48), torch_model.predict_sliding(large, 48)) >= 0.999


def test_predict_cli_with_runtime_onnx_writes_the_pytorch_masks(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    from PIL import Image

    image = noise_image(33, 45, 5)
    Image.fromarray(image).save(tmp_path / "a.png")
    result = run_predict(str(tmp_path / "a.png"), "--model", str(checkpoint), "--out", str(tmp_path / "out"),
                         "--runtime", "onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    labels = assert_label_png(tmp_path / "out" / "a.png", (45, 33))
    reference = Segmenter(tiny_net(), "imagenet", device="cpu", precision="fp32")
    assert agreement(labels, reference.predict(image)) >= 0.999
