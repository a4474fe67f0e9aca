"""Which inference runtime ``fcnseg predict`` / ``evaluate`` use: PyTorch (fp32, or bf16 where the hardware has it)
or onnxruntime, chosen by the device and the CPU's features unless ``--runtime`` says.

``auto``: CUDA → PyTorch (bf16 autocast); a CPU with AMX / AVX512-BF16 → PyTorch bf16 + channels_last; any other
CPU → onnxruntime fp32 when it is installed (measured faster than PyTorch eager fp32 on this repo's AVX2 machine:
benchmarks/results/inference_runtimes.json), else PyTorch fp32.
"""

from __future__ import annotations

import importlib.util

import torch

from fcnseg.errors import ConfigError
from fcnseg.inference import Segmenter, cpu_has_native_bf16, load_segmenter

RUNTIMES = ("auto", "torch", "onnx")


def choose_runtime(runtime: str, device: torch.device) -> str:
    """``torch`` or ``onnx`` for ``runtime`` (see the module docstring for ``auto``)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime != "auto":
        return runtime
    if device.type != "cpu" or cpu_has_native_bf16():
        return "torch"
    return "onnx" if importlib.util.find_spec("onnxruntime") is not None else "torch"


def load_runtime_segmenter(model: str, runtime: str = "auto", device: str | None = None, **kwargs) -> Segmenter:
    """:func:`fcnseg.inference.load_segmenter` on the chosen runtime (``kwargs``: variant, tracking_uri, …)."""
    segmenter = load_segmenter(model, device=device, **kwargs)
    if choose_runtime(runtime, segmenter.device) == "torch":
        return segmenter
    if segmenter.device.type != "cpu":
        raise ConfigError("--runtime onnx runs on the CPU; drop --device or pass --device cpu")
    if importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError("--runtime onnx needs onnxruntime: pip install onnxruntime")
    from fcnseg.export import OnnxRuntimeSegmenter

    return OnnxRuntimeSegmenter(segmenter)
