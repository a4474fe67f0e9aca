"""Shared helpers for the benchmark scripts: machine description, timing, JSON + PNG output.

Every benchmark measures its baseline in the same run as the thing it compares, and reports ratios; absolute
numbers depend on the machine (recorded in ``machine`` of each JSON, load average included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise asks PyPI for updates

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SRC_DIR = Path(__file__).resolve().parent.parent / "src"
if SRC_DIR.is_dir() and str(SRC_DIR) not in sys.path:
    sys.path.insert(0, str(SRC_DIR))  # run from a checkout without `pip install -e .`


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU, cores, thread count, library versions, GPU (if any) and the load average when the run started."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def shared_machine_note(info: dict[str, Any]) -> str | None:
    """A warning when other work competed for the CPU (load average above the usable core count)."""
    load = max(info.get("loadavg_start", [0])[0], os.getloadavg()[0])
    cores = info.get("usable_cores") or 1
    if load > 0.75 * cores:
        return f"machine shared: 1-min load average up to {load:.2f} on {cores} cores; absolute timings are noisy"
    return None


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def time_repeats(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None) \
        -> list[float]:
    """Wall seconds of ``fn()`` for each of ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def write_results(name: str, payload: dict[str, Any], machine: dict[str, Any], started: float) -> Path:
    """``benchmarks/results/<name>.json`` with the payload, the machine, wall time and end-of-run load average."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    machine = {**machine, "loadavg_end": list(os.getloadavg())}
    note = shared_machine_note(machine)
    out = {"benchmark": name, "machine": machine, "wall_s": round(time.perf_counter() - started, 1), **payload}
    if note:
        out["note"] = note
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(out, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, name: str) -> Path:
    import matplotlib.pyplot as plt

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bar_plot(name: str, labels: list[str], values: list[float], ylabel: str, title: str) -> Path:
    fig, (ax,) = new_figure(width=max(5.0, 1.3 * len(labels)))
    bars = ax.bar(range(len(labels)), values, color=["#888888"] + ["#1f77b4"] * (len(labels) - 1))
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save_figure(fig, name)


def make_module(width: float):
    """FCN-8s of ``width`` in a SegmentationModule with the paper's SGD (momentum 0.9, wd 5e-4, 2x bias lr)."""
    from fcnseg.module import SegmentationModule

    net = {"_target_": "fcnseg.models.build_fcn", "name": "fcn8s", "num_classes": 21, "width": width,
           "backbone_weights": None}
    optim = {"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 1e-4, "momentum": 0.9,
                           "weight_decay": 5e-4},
             "scheduler": None, "bias_lr_mult": 2.0, "bias_weight_decay": 0.0, "loss_reduction": "mean"}
    return SegmentationModule(net=net, optim=optim)
