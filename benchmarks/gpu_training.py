"""Single-GPU training speed of FCN-8s (width 1, the paper's net): the real training step and a bare step, one run.

    python benchmarks/gpu_training.py [--quick]       # needs CUDA; otherwise writes "skipped" and exits
    python benchmarks/gpu_training.py --dry-run       # CPU, tiny sizes: checks the script, not the GPU

**Real step** (``headline``): ``fcnseg.train.train`` itself, on the config composed from ``conf/`` (``model=fcn8s``,
``optim=sgd``, ``trainer=gpu``: bf16-mixed, cuDNN benchmark; ``training.*`` as configured, e.g. channels_last):
``SegmentationModule`` under ``lightning.Trainer`` with the callbacks and loggers training uses (best/last
checkpoints, RNG state, CSV, and MLflow to a local SQLite store when mlflow is importable). Only the datamodule is
swapped, for ``common.InMemoryDataModule``: batches made once in host memory (pinned), copied to the GPU each step
as in training, so the data loader is out of the measurement. Steps/s come from ``global_step`` between two device
synchronisations (no sync per step).

**Bare step** (``bare_step``): the same module's net, criterion and optimiser (``configure_optimizers``) in a plain
loop: bf16 autocast, channels_last, batch already on the GPU. ``headline.real_vs_bare_step`` = real / bare images/s.
FLOPs per image (forward + backward) from ``torch.utils.flop_counter``; ``headline.mfu`` = the real step's FLOP/s
over the card's dense bf16 peak (looked up by name; unknown cards get none). Also: an fp32 bare baseline, crop and
batch sweeps (bare step), and the paper's recipe (``experiment=paper``: batch 1 whole images of varying sizes,
summed loss, SGD momentum 0.99) timed bare with cuDNN benchmark on and off (its per-shape autotuning cost) and real,
with hours per 100,000 / 300,000 iterations = iterations x s/iteration.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose, machine_info, measure_real, new_figure, parse_args, save_figure  # noqa: E402
from common import write_results  # noqa: E402

import torch  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's data sheets. Order matters: first match wins.
BF16_PEAK_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 989.0),
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),  # SXM
    (("A100",), 312.0),
    (("L40S",), 362.0),
    (("A10G",), 70.0),
]
# Iterations of the paper's solvers: FCN-8s at-once, and each stage of the staged nets.
PAPER_ITERATIONS = {"paper (FCN-8s at-once)": 300_000, "paper_staged_* (each stage)": 100_000}


def bf16_peak_tflops(gpu_name: str) -> float | None:
    name = gpu_name.upper()
    for keys, peak in BF16_PEAK_TFLOPS:
        if all(key in name for key in keys):
            return peak
    return None


def voc_like_sizes(count: int, seed: int = 0, long_side: int = 500, scale: float = 1.0) -> list[tuple[int, int]]:
    """(H, W) of VOC-like photos: long side 500, short side 250-500, portrait or landscape (VOC's sizes vary so)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = []
    for _ in range(count):
        short = int(torch.randint(long_side // 2, long_side + 1, (1,), generator=generator))
        size = (short, long_side) if torch.rand(1, generator=generator) < 0.7 else (long_side, short)
        sizes.append((max(8, int(size[0] * scale)), max(8, int(size[1] * scale))))
    return sizes


class BareStep:
    """The module's net, criterion and optimiser, one fixed batch on the device, a plain training step."""

    def __init__(self, overrides: list[str], width: float, crop: int, batch: int, device: torch.device,
                 bf16: bool = True, channels_last: bool = True) -> None:
        from fcnseg.train import build_module

        torch.manual_seed(0)
        cfg = compose([*overrides, "model.net.backbone_weights=null", f"model.net.width={width}"])
        module = build_module(cfg).to(device)
        self.device, self.bf16, self.batch = device, bf16, batch
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = module.net.to(memory_format=self.memory_format).train()
        self.criterion = module.criterion
        optimizers = module.configure_optimizers()
        self.optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, crop, crop, generator=generator).to(device,
                                                                              memory_format=self.memory_format)
        self.masks = torch.randint(0, 21, (batch, crop, crop), generator=generator).to(torch.uint8).to(device)

    def step(self, images: torch.Tensor | None = None, masks: torch.Tensor | None = None) -> None:
        images = self.images if images is None else images
        masks = self.masks if masks is None else masks
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.net(images)
        loss = self.criterion(logits.float(), masks.long())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def flops_per_image(self) -> float:
        """Forward + backward FLOPs of one training step, per image (the optimiser step is not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            with FlopCounterMode(display=False) as counter:
                logits = self.net(self.images)
                loss = self.criterion(logits.float(), self.masks.long())
                loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops() / self.batch


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_bare(overrides: list[str], width: float, crop: int, batch: int, device: torch.device, steps: int,
                 warmup: int, bf16: bool = True, channels_last: bool = True, count_flops: bool = False) -> dict:
    """Images/s of the bare step (median of per-step times, each synchronised), peak memory; OOM is reported."""
    config = {"crop": crop, "batch": batch, "bf16": bf16, "channels_last": channels_last}
    setup = None
    try:
        setup = BareStep(overrides, width, crop, batch, device, bf16, channels_last)
        for _ in range(warmup):
            setup.step()
        setup.sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            setup.step()
            setup.sync()
            times.append(time.perf_counter() - start)
        result = {**config, "images_per_s": batch / statistics.median(times), "step_s": times}
        if device.type == "cuda":
            result["peak_memory_per_image_gib"] = torch.cuda.max_memory_allocated() / batch / 2**30
        if count_flops:
            result["flops_per_image"] = setup.flops_per_image()
        return result
    except torch.OutOfMemoryError as exc:
        return {**config, "error": f"out of memory: {str(exc).splitlines()[0][:160]}"}
    finally:
        del setup
        _free(device)


def paper_recipe_bare(width: float, device: torch.device, sizes: list[tuple[int, int]], repeats: int,
                      cudnn_benchmark: bool) -> dict:
    """Batch-1 whole images of varying sizes through the paper preset's step (summed loss, SGD 0.99): the time of
    a shape's first step (cuDNN autotunes each new shape when benchmark is on) and of its later steps."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        setup = BareStep(["experiment=paper"], width, 8, 1, device)
        generator = torch.Generator().manual_seed(1)
        data = [(torch.randn(1, 3, h, w, generator=generator).to(device, memory_format=setup.memory_format),
                 torch.randint(0, 21, (1, h, w), generator=generator).to(torch.uint8).to(device)) for h, w in sizes]
        first, later = [], []
        for repeat in range(repeats):
            for images, masks in data:
                start = time.perf_counter()
                setup.step(images, masks)
                setup.sync()
                (first if repeat == 0 else later).append(time.perf_counter() - start)
        return {"cudnn_benchmark": cudnn_benchmark, "distinct_shapes": len(sizes), "repeats": repeats,
                "first_step_per_shape_s_mean": statistics.mean(first),
                "later_steps_s_median": statistics.median(later) if later else None,
                "autotune_cost_per_shape_s": (statistics.mean(first) - statistics.median(later)) if later else None}
    finally:
        torch.backends.cudnn.benchmark = previous
        _free(device)


def hours(seconds_per_iteration: float | None) -> dict | None:
    if not seconds_per_iteration:
        return None
    return {name: round(iterations * seconds_per_iteration / 3600, 2) for name, iterations in PAPER_ITERATIONS.items()}


def skip(started: float, reason: str) -> None:
    machine = machine_info()
    machine.setdefault("gpu", None)
    path = write_results("gpu_training", {"skipped": True, "reason": reason,
                                          "headline": {"mfu": None, "real_vs_bare_step": None, "images_per_s": None}},
                         machine, started)
    print(f"no GPU: skipped ({path})")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny model and sizes: check the script, not the GPU"))
    import logging
    import warnings

    import lightning  # noqa: F401  (its import sets its loggers' levels: quieten them afterwards)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not args.dry_run and not cuda:
        skip(started, "torch.cuda.is_available() is False")
        return
    machine = machine_info()
    machine.setdefault("gpu", None)
    model = ["model=fcn8s", "optim=sgd"]
    if args.dry_run:
        device, width = torch.device("cpu"), 0.0625
        (crop0, batch0), crops, batches, steps, warmup = (32, 2), [32, 48], [1, 2], 2, 1
        real_batches, real_start = 8, 2
        paper_sizes, paper_repeats = voc_like_sizes(3, scale=0.1), 2
    else:
        device, width = torch.device("cuda"), 1.0
        torch.backends.cudnn.benchmark = True  # as trainer=gpu sets
        (crop0, batch0), crops, batches = (512, 8), [256, 384, 512, 768], [4, 8, 16]
        steps, warmup = (5, 2) if args.quick else (15, 3)
        real_batches, real_start = (25, 8) if args.quick else (60, 15)
        paper_sizes, paper_repeats = voc_like_sizes(8 if args.quick else 20), 3

    real = measure_real(model, cuda, width, crop0, batch0, real_batches, real_start)
    print(f"  real step (fcnseg.train.train) {crop0}² batch {batch0}: {real.get('images_per_s', 0):.1f} images/s",
          flush=True)
    bare = measure_bare(model, width, crop0, batch0, device, steps, warmup, count_flops=True)
    print(f"  bare step {crop0}² batch {batch0}: {bare.get('images_per_s', 0):.1f} images/s", flush=True)
    fp32 = measure_bare(model, width, crop0, batch0, device, steps, warmup, bf16=False, channels_last=False)
    print(f"  bare fp32 baseline: {fp32.get('images_per_s', 0):.1f} images/s", flush=True)

    peak_tflops = bf16_peak_tflops(machine["gpu"] or "") if cuda else None
    headline = {"images_per_s": real.get("images_per_s"), "real_vs_bare_step": None, "mfu": None,
                "achieved_tflops": None, "bf16_peak_tflops": peak_tflops,
                "flops_per_image": bare.get("flops_per_image"), "crop": crop0, "batch": batch0,
                "device": machine["gpu"] or str(device)}
    if real.get("images_per_s") and bare.get("images_per_s"):
        headline["real_vs_bare_step"] = real["images_per_s"] / bare["images_per_s"]
    if real.get("images_per_s") and bare.get("flops_per_image"):
        achieved = bare["flops_per_image"] * real["images_per_s"]
        headline["achieved_tflops"] = achieved / 1e12
        headline["mfu"] = achieved / (peak_tflops * 1e12) if peak_tflops else None
    if bare.get("images_per_s") and fp32.get("images_per_s"):
        bare["speedup_vs_fp32"] = bare["images_per_s"] / fp32["images_per_s"]

    sweep_crop = [measure_bare(model, width, crop, batch0, device, steps, warmup) for crop in crops]
    sweep_batch = [measure_bare(model, width, crop0, batch, device, steps, warmup) for batch in batches]
    for r in sweep_crop + sweep_batch:
        print(f"  sweep {r['crop']}² batch {r['batch']}: "
              + (f"{r['images_per_s']:.1f} images/s" if "images_per_s" in r else r["error"]), flush=True)

    # The paper's recipe: batch 1, whole images of varying sizes.
    paper = {"sizes": paper_sizes,
             "bare_cudnn_benchmark_on": paper_recipe_bare(width, device, paper_sizes, paper_repeats, True),
             "bare_cudnn_benchmark_off": paper_recipe_bare(width, device, paper_sizes, paper_repeats, False)}
    paper["real"] = measure_real(["experiment=paper", "trainer.benchmark=false"], cuda, width, 0, 1,
                                 len(paper_sizes) * paper_repeats, len(paper_sizes), sizes=paper_sizes)
    real_s = 1 / paper["real"]["steps_per_s"] if paper["real"].get("steps_per_s") else None
    paper["real"]["s_per_iteration"] = real_s
    paper["hours_from_real_step"] = hours(real_s)
    on, off = paper["bare_cudnn_benchmark_on"], paper["bare_cudnn_benchmark_off"]
    for arm in (on, off):
        arm["hours_from_later_steps"] = hours(arm["later_steps_s_median"])
    print(f"  paper recipe, batch 1 varying sizes: real {real_s or float('nan'):.4f} s/iter; bare later steps "
          f"benchmark on {on['later_steps_s_median'] or float('nan'):.4f} s, off "
          f"{off['later_steps_s_median'] or float('nan'):.4f} s; autotune per new shape "
          f"{on['autotune_cost_per_shape_s'] or float('nan'):.3f} s", flush=True)

    payload = {
        "config": {"model": f"fcn8s width {width}", "device": str(device), "dry_run": args.dry_run,
                   "quick": args.quick, "bare_timed_steps": steps, "bare_warmup_steps": warmup,
                   "real": "fcnseg.train.train on the composed config (trainer=gpu/cpu), in-memory datamodule",
                   "bare": "bf16 autocast + channels_last, module's net/criterion/optimiser, batch on the device"},
        "headline": headline,
        "real_step": real,
        "bare_step": bare,
        "fp32_bare_baseline": fp32,
        "sweep_crop_size": sweep_crop,
        "sweep_batch_size": sweep_batch,
        "paper_recipe": paper,
        "bf16_peak_table_tflops": {" ".join(k): v for k, v in BF16_PEAK_TFLOPS},
    }
    name = "gpu_training_dryrun" if args.dry_run else "gpu_training"
    path = write_results(name, payload, machine, started)

    fig, (ax_crop, ax_batch) = new_figure(ncols=2)
    ok_crop = [r for r in sweep_crop if "images_per_s" in r]
    ok_batch = [r for r in sweep_batch if "images_per_s" in r]
    ax_crop.plot([r["crop"] for r in ok_crop], [r["images_per_s"] for r in ok_crop], "o-", label="bare step")
    if real.get("images_per_s"):
        ax_crop.plot([crop0], [real["images_per_s"]], "s", label="real step (Trainer)")
    ax_crop.set_xlabel(f"crop size (batch {batch0})")
    ax_crop.set_ylabel("training images/s")
    ax_crop.set_title(f"FCN-8s w{width}, bf16 + channels_last, {machine['gpu'] or device.type}", fontsize=9)
    ax_crop.legend()
    ax_batch.plot([r["batch"] for r in ok_batch], [r["images_per_s"] for r in ok_batch], "o-")
    ax_batch.set_xlabel(f"batch size (crop {crop0})")
    ax_batch.set_ylabel("training images/s (bare step)")
    for ax in (ax_crop, ax_batch):
        ax.set_ylim(bottom=0)
    save_figure(fig, name)

    mfu, ratio = headline["mfu"], headline["real_vs_bare_step"]
    print(f"gpu_training{' (dry run, CPU)' if args.dry_run else ''}: real step {headline['images_per_s'] or 0:.1f} "
          f"img/s at {crop0}² batch {batch0}, real/bare {'n/a' if ratio is None else f'{ratio:.2f}'}, "
          f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}, {(bare.get('flops_per_image') or 0) / 1e9:.1f} GFLOP/image; "
          f"paper recipe {real_s or float('nan'):.4f} s/iter; {path}")


if __name__ == "__main__":
    main()
