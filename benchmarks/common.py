"""Shared helpers for the benchmark scripts: machine description, timing, JSON + PNG output.

Every benchmark measures its baseline in the same run as the thing it compares, and reports ratios; absolute
numbers depend on the machine (recorded in ``machine`` of each JSON, load average included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise asks PyPI for updates

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
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


class TimedBatches:
    """An iterable of pre-made ``(images, masks)`` batches (host memory, pinned on CUDA) that records, at its
    ``marks`` (batch indices), the time and the trainer's ``global_step`` after a device synchronisation.

    Lightning fetches batch i+1 before it runs step i, so the marks fall between steps; counting optimiser steps by
    ``global_step`` (not by batches) makes the rate exact whatever the fetcher's look-ahead. Two synchronisations
    per run, none per step: the step runs as it does in training.
    """

    def __init__(self, batches: list, length: int, marks: tuple[int, int], owner) -> None:
        self.batches, self.length, self.marks, self.owner = batches, length, marks, owner
        self.stamps: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        import torch

        for index in range(self.length):
            if index in self.marks:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                trainer = self.owner.trainer
                self.stamps.append((time.perf_counter(), trainer.global_step if trainer is not None else index))
            yield self.batches[index % len(self.batches)]

    def steps_per_s(self) -> float | None:
        if len(self.stamps) < 2 or self.stamps[-1][1] <= self.stamps[0][1]:
            return None
        (t0, s0), (t1, s1) = self.stamps[0], self.stamps[-1]
        return (s1 - s0) / (t1 - t0)


def _make_lightning_datamodule_class():
    import lightning as L
    import torch

    class InMemoryDataModule(L.LightningDataModule):
        """Training batches made once in memory (random images, uint8 masks with some void), so a benchmark times
        the training step, its callbacks and loggers, not JPEG decoding. ``sizes``: a list of (H, W) for batch-1
        whole images of varying sizes (the paper's recipe); else square ``train_transform.crop_size`` crops.
        Accepts (and ignores) the other keys of ``data.datamodule``, so a composed config can point its
        ``_target_`` here and everything else in ``fcnseg.train.train`` stays as it is.
        """

        last = None  # the instance fcnseg.train built, for the benchmark to read its timings

        def __init__(self, batch_size: int = 8, train_transform: dict | None = None, num_train_batches: int = 20,
                     timing_start: int = 5, distinct_batches: int = 4, sizes: list | None = None,
                     num_val_images: int = 2, seed: int = 0, **_: object) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(seed)
            pin = torch.cuda.is_available()

            def batch_of(n: int, height: int, width: int):
                images = torch.randn(n, 3, height, width, generator=generator)
                masks = torch.randint(0, 21, (n, height, width), generator=generator).to(torch.uint8)
                masks[:, :4] = 255  # some void, as real labels have
                return (images.pin_memory(), masks.pin_memory()) if pin else (images, masks)

            if sizes:
                batches = [batch_of(1, int(h), int(w)) for h, w in sizes]
            else:
                crop = int((train_transform or {}).get("crop_size") or 320)
                batches = [batch_of(batch_size, crop, crop) for _ in range(distinct_batches)]
            self.train_batches = TimedBatches(batches, num_train_batches, (timing_start, num_train_batches - 1), self)
            height, width = batches[0][0].shape[-2:]
            self.val_batches = [batch_of(1, height, width) for _ in range(num_val_images)]
            InMemoryDataModule.last = self

        def train_dataloader(self):
            return self.train_batches

        def val_dataloader(self):
            # batch_size=None: the pre-made batches as they are (a bare list would read as several loaders)
            return torch.utils.data.DataLoader(self.val_batches, batch_size=None)

    return InMemoryDataModule


def in_memory_datamodule_class():
    """``InMemoryDataModule``, built on first use so that the scripts that never train do not import Lightning."""
    if "InMemoryDataModule" not in globals():
        globals()["InMemoryDataModule"] = _make_lightning_datamodule_class()
    return globals()["InMemoryDataModule"]


def __getattr__(name: str):  # `common.InMemoryDataModule`, as a config's _target_ names it
    if name == "InMemoryDataModule":
        return in_memory_datamodule_class()
    raise AttributeError(name)


# -- the real training path (fcnseg.train.train) on in-memory batches ---------------------------------------

def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose("config", overrides=overrides)


def run_config(overrides: list[str], workdir: Path, cuda: bool, width: float, crop: int, batch: int,
               num_batches: int, timing_start: int, sizes: list | None = None):
    """The training config as composed from conf/, pointed at the in-memory datamodule and a scratch directory."""
    from omegaconf import OmegaConf

    from fcnseg.data.synthetic import write_synthetic_voc

    # A real (tiny) VOC-layout dataset for what train() does after fit (lineage, evaluation of the best checkpoint).
    root = write_synthetic_voc(workdir / "data" / "VOC2012", num_train=1, num_val=2, height=32, width=32)
    cfg = compose([*overrides, "model.net.backbone_weights=null", f"model.net.width={width}",
                   f"trainer={'gpu' if cuda else 'cpu'}", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                   "ckpt_path=null", f"paths.output_dir={workdir / 'run'}", f"data.root={root}"])
    OmegaConf.set_struct(cfg, False)
    cfg.trainer.max_steps = -1  # one epoch of the in-memory batches
    cfg.trainer.pop("max_time", None)
    if cfg.trainer.get("val_check_interval") is not None:  # the paper preset validates every 4,000 iterations
        cfg.trainer.val_check_interval = None
        cfg.trainer.check_val_every_n_epoch = 1
    cfg.data.datamodule = {"_target_": "common.InMemoryDataModule", "batch_size": batch, "train_split": "train",
                           "val_split": "val", "num_workers": 0,
                           "train_transform": {"crop_size": crop}, "num_train_batches": num_batches,
                           "timing_start": timing_start, "sizes": [list(s) for s in sizes] if sizes else None}
    mlflow_ok = importlib.util.find_spec("mlflow") is not None
    cfg.tracking.enabled = mlflow_ok
    cfg.tracking.tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg.tracking.log_model = False  # after fit, outside the timed steps: not what is measured here
    return cfg, mlflow_ok


def measure_real(overrides: list[str], cuda: bool, width: float, crop: int, batch: int, num_batches: int,
                 timing_start: int, sizes: list | None = None) -> dict:
    """Images/s of ``fcnseg.train.train`` (Trainer, callbacks, loggers) on the in-memory datamodule."""
    from omegaconf import OmegaConf

    from fcnseg.train import train

    with tempfile.TemporaryDirectory(prefix="fcnseg-bench-") as tmp:
        cfg, mlflow_ok = run_config(overrides, Path(tmp), cuda, width, crop, batch, num_batches, timing_start, sizes)
        started = time.perf_counter()
        cwd = os.getcwd()
        os.chdir(tmp)  # MLflow's SQLite store puts run artifacts (checkpoint copies) under ./mlruns: here, not the repo
        try:
            train(cfg, output_dir=Path(tmp) / "run")
        finally:
            os.chdir(cwd)
        wall = time.perf_counter() - started
        datamodule = in_memory_datamodule_class().last
        trainer, timer = datamodule.trainer, datamodule.train_batches
    result = {"crop": crop, "batch": batch, "fit_wall_s": wall, "overrides": overrides,
              "timed_steps": timer.stamps[-1][1] - timer.stamps[0][1] if len(timer.stamps) > 1 else 0,
              "callbacks": sorted({type(cb).__name__ for cb in trainer.callbacks}),
              "loggers": [type(logger).__name__ for logger in trainer.loggers], "mlflow_importable": mlflow_ok,
              "precision": str(trainer.precision),
              "training": OmegaConf.to_container(cfg.training) if "training" in cfg else {}}
    steps_per_s = timer.steps_per_s()
    if steps_per_s:
        result["steps_per_s"] = steps_per_s
        result["images_per_s"] = steps_per_s * batch
    return result
