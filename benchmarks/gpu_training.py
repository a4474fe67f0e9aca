"""Single-GPU training throughput of FCN-8s (width 1, the paper's net): images/s, FLOPs, MFU, memory, scaling.

    python benchmarks/gpu_training.py [--quick]       # needs CUDA; otherwise prints "no GPU: skipped"
    python benchmarks/gpu_training.py --dry-run       # CPU, tiny sizes: checks the script's logic

The training step is the one fcnseg runs with ``trainer=gpu``: bf16 autocast ("bf16-mixed"), channels_last, cuDNN
benchmark, SGD with the module's parameter groups (``SegmentationModule.configure_optimizers``), loss on
float32 logits. Batches are random tensors already on the GPU, so this measures the model, not the data loader.
The baseline, measured in the same run at the headline setting (512x512 crops, batch 8), is fp32 without
channels_last. FLOPs per image (forward + backward) come from ``torch.utils.flop_counter.FlopCounterMode``; MFU is
achieved FLOP/s over the card's dense bf16 peak (looked up by name; unknown cards get no MFU).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, make_module, new_figure, parse_args, save_figure, write_results  # noqa: E402

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


def bf16_peak_tflops(gpu_name: str) -> float | None:
    name = gpu_name.upper()
    for keys, peak in BF16_PEAK_TFLOPS:
        if all(key in name for key in keys):
            return peak
    return None


class Setup:
    """A model, its optimiser and one fixed batch on ``device``, with a ``step()`` doing one training step."""

    def __init__(self, width: float, crop: int, batch: int, device: torch.device, bf16: bool,
                 channels_last: bool) -> None:
        torch.manual_seed(0)
        module = make_module(width)
        self.device, self.bf16 = device, bf16
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = module.net.to(device=device, memory_format=memory_format).train()
        self.criterion = module.criterion
        self.optimizer = module.configure_optimizers()  # no scheduler configured: a plain optimiser
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, crop, crop, generator=generator).to(device,
                                                                              memory_format=memory_format)
        self.masks = torch.randint(0, 21, (batch, crop, crop), generator=generator).to(device)
        self.batch = batch

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.net(self.images)
        loss = self.criterion(logits.float(), self.masks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def flops_per_image(setup: Setup) -> float:
    """Forward + backward FLOPs of one training step, per image (the optimiser step is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.bf16):
        with FlopCounterMode(display=False) as counter:
            logits = setup.net(setup.images)
            loss = setup.criterion(logits.float(), setup.masks)
            loss.backward()
    setup.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / setup.batch


def measure(width: float, crop: int, batch: int, device: torch.device, steps: int, warmup: int,
            bf16: bool = True, channels_last: bool = True, count_flops: bool = False) -> dict:
    """images/s (median over timed steps), peak memory; ``{"error": ...}`` when it does not fit."""
    config = {"crop": crop, "batch": batch, "bf16": bf16, "channels_last": channels_last}
    setup = None
    try:
        setup = Setup(width, crop, batch, device, bf16, channels_last)
        for _ in range(warmup):
            setup.step()
        setup.sync()
        static_bytes = None
        if device.type == "cuda":
            static_bytes = torch.cuda.memory_allocated()  # weights, grads (freed), momentum buffers
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            setup.step()
            setup.sync()
            times.append(time.perf_counter() - start)
        result = {**config, "images_per_s": batch / statistics.median(times), "step_s": times}
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
            result["peak_memory_gib"] = peak / 2**30
            result["peak_memory_per_image_gib"] = peak / batch / 2**30
            result["activation_memory_per_image_gib"] = (peak - static_bytes) / batch / 2**30
        if count_flops:
            result["flops_per_image"] = flops_per_image(setup)
        return result
    except torch.OutOfMemoryError as exc:
        return {**config, "error": f"out of memory: {str(exc).splitlines()[0][:160]}"}
    finally:
        del setup
        if device.type == "cuda":
            torch.cuda.empty_cache()


def skip(started: float, reason: str) -> None:
    path = write_results("gpu_training", {"skipped": True, "reason": reason}, machine_info(), started)
    print(f"no GPU: skipped ({path})")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny model and sizes: check the script, not the GPU"))
    started = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        skip(started, "torch.cuda.is_available() is False")
        return
    machine = machine_info()
    if args.dry_run:
        device, width = torch.device("cpu"), 0.0625
        headline, crops, batches, steps, warmup = (32, 2), [32, 48], [1, 2], 1, 1
    else:
        device, width = torch.device("cuda"), 1.0
        torch.backends.cudnn.benchmark = True  # as trainer=gpu sets
        headline, crops, batches = (512, 8), [256, 384, 512, 768], [4, 8, 16]
        steps, warmup = (5, 2) if args.quick else (15, 3)
    crop0, batch0 = headline

    main_result = measure(width, crop0, batch0, device, steps, warmup, count_flops=True)
    print(f"  bf16 channels_last {crop0}² batch {batch0}: {main_result.get('images_per_s', 0):.1f} images/s",
          flush=True)
    baseline = measure(width, crop0, batch0, device, steps, warmup, bf16=False, channels_last=False)
    print(f"  fp32 baseline {crop0}² batch {batch0}: {baseline.get('images_per_s', 0):.1f} images/s", flush=True)
    if "images_per_s" in main_result and "images_per_s" in baseline:
        main_result["speedup_vs_fp32"] = main_result["images_per_s"] / baseline["images_per_s"]

    peak_tflops = None if args.dry_run else bf16_peak_tflops(machine.get("gpu", ""))
    if "flops_per_image" in main_result and "images_per_s" in main_result:
        achieved = main_result["flops_per_image"] * main_result["images_per_s"]
        main_result["achieved_tflops"] = achieved / 1e12
        main_result["bf16_peak_tflops"] = peak_tflops
        main_result["mfu"] = achieved / (peak_tflops * 1e12) if peak_tflops else None

    sweep_crop = [measure(width, crop, batch0, device, steps, warmup) for crop in crops]
    sweep_batch = [measure(width, crop0, batch, device, steps, warmup) for batch in batches]
    for r in sweep_crop + sweep_batch:
        print(f"  sweep {r['crop']}² batch {r['batch']}: "
              + (f"{r['images_per_s']:.1f} images/s" if "images_per_s" in r else r["error"]), flush=True)
    payload = {
        "config": {"model": f"fcn8s width {width}", "device": str(device), "precision": "bf16 autocast",
                   "memory_format": "channels_last", "optimizer": "SGD momentum (configure_optimizers)",
                   "timed_steps": steps, "warmup_steps": warmup, "dry_run": args.dry_run, "quick": args.quick,
                   "data": "fixed random batch on the device (model throughput, not the loader)"},
        "headline": main_result,
        "fp32_baseline": baseline,
        "sweep_crop_size": sweep_crop,
        "sweep_batch_size": sweep_batch,
        "bf16_peak_table_tflops": {" ".join(k): v for k, v in BF16_PEAK_TFLOPS},
    }
    name = "gpu_training_dryrun" if args.dry_run else "gpu_training"
    path = write_results(name, payload, machine, started)

    fig, (ax_crop, ax_batch) = new_figure(ncols=2)
    ok_crop = [r for r in sweep_crop if "images_per_s" in r]
    ok_batch = [r for r in sweep_batch if "images_per_s" in r]
    ax_crop.plot([r["crop"] for r in ok_crop], [r["images_per_s"] for r in ok_crop], "o-")
    ax_crop.set_xlabel(f"crop size (batch {batch0})")
    ax_crop.set_ylabel("training images/s")
    ax_crop.set_title(f"FCN-8s w{width}, bf16 + channels_last, {machine.get('gpu', device.type)}", fontsize=9)
    ax_batch.plot([r["batch"] for r in ok_batch], [r["images_per_s"] for r in ok_batch], "o-")
    ax_batch.set_xlabel(f"batch size (crop {crop0})")
    ax_batch.set_ylabel("training images/s")
    for ax in (ax_crop, ax_batch):
        ax.set_ylim(bottom=0)
    save_figure(fig, name)

    mfu = main_result.get("mfu")
    print(f"gpu_training{' (dry run, CPU)' if args.dry_run else ''}: {main_result.get('images_per_s', 0):.1f} img/s "
          f"at {crop0}² batch {batch0}, {main_result.get('speedup_vs_fp32', float('nan')):.2f}x fp32 baseline, "
          f"{main_result.get('flops_per_image', 0) / 1e9:.1f} GFLOP/image, "
          f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}; {path}")


if __name__ == "__main__":
    main()
