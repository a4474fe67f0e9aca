"""Inference speed of FCN-8s (width 1, the paper's net) on 500x375 images: fp32 eager vs faster settings.

    python benchmarks/inference.py [--quick] [--no-compile] [--device cpu|cuda]

CPU variants: fp32 eager under ``torch.no_grad`` (the baseline), ``torch.inference_mode``, channels_last,
bf16 autocast, and ``torch.compile`` (compile time reported separately). On CUDA (when available, or
``--device cuda``): fp32 eager baseline, bf16 autocast, bf16 + channels_last, ``torch.compile``, and
``torch.compile(mode="reduce-overhead")`` (CUDA graphs). Batch 1 and batch 16 (``--quick``: batch 4); on CPU the
larger batch only runs the baseline and the fastest batch-1 variant, with few iterations. Weights are random
(speed does not depend on them). Reference points, not ratios: the paper's 175 ms/image (Caffe, K40c, 500x500)
and the PyTorch port's ~43 ms (wkentaro/pytorch-fcn, Titan X).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, new_figure, parse_args, save_figure, write_results  # noqa: E402

import torch  # noqa: E402

HEIGHT, WIDTH = 375, 500
REFERENCE_POINTS = {
    "paper_fcn8s_ms_per_image": {"value": 175, "hardware": "NVIDIA Tesla K40c, Caffe, 500x500 (Long et al. 2015)"},
    "pytorch_fcn_port_ms_per_image": {"value": 43, "hardware": "NVIDIA Titan X, wkentaro/pytorch-fcn README"},
}


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_net(device: torch.device) -> torch.nn.Module:
    from fcnseg.models import build_fcn

    torch.manual_seed(0)
    return build_fcn("fcn8s", num_classes=21, width=1.0).eval().to(device)


def make_variant(name: str, device: torch.device) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor],
                                                            bool]:
    """(net, forward(x) -> scores, wants channels_last input) for a named setting."""
    net = build_net(device)
    channels_last = "channels_last" in name
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    bf16 = "bf16" in name
    compiled = "compile" in name
    model = net
    if compiled:
        mode = "reduce-overhead" if "reduce-overhead" in name else None
        model = torch.compile(net, mode=mode)
    grad_ctx = torch.no_grad if name.startswith("fp32 eager (no_grad") else torch.inference_mode

    def forward(x: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with grad_ctx(), autocast:
            out = model(x)
            # the label map is what inference returns; argmax makes the whole output count
            return out.argmax(1)

    return net, forward, channels_last


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, device: torch.device, batch: int, iterations: int, warmup: int) -> dict:
    net, forward, channels_last = make_variant(name, device)
    x = torch.randn(batch, 3, HEIGHT, WIDTH, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    forward(x)  # first call: compilation, cuDNN/oneDNN algorithm choice, allocator
    sync(device)
    first_call_s = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        forward(x)
    sync(device)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        forward(x)
        sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    fastest = min(times)
    result = {"batch": batch, "ms_per_image": median / batch * 1e3, "images_per_s": batch / median,
              "iterations": iterations, "times_s": times,
              "ms_per_image_fastest": fastest / batch * 1e3, "first_call_s": first_call_s}
    if "compile" in name:
        result["compile_s_estimate"] = max(first_call_s - median, 0.0)  # first call minus a steady call
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--no-compile", action="store_true", help="skip torch.compile variants"),
        p.add_argument("--device", choices=["cpu", "cuda"], default=None),
        p.add_argument("--cpu-bf16", action="store_true", help="also time bf16 autocast on a CPU without bf16"),
        p.add_argument("--large-batch", type=int, default=None, help="the larger batch (default 16; --quick: 4)"),
    ))
    started = time.perf_counter()
    machine = machine_info()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # On CPU a call costs ~batch x a batch-1 call (see cost_growth.py): batch 16 is ~50 s per call on 2 cores,
    # so the CPU times it with few iterations (see the plan below).
    large = args.large_batch or (4 if args.quick else 16)
    baseline = "fp32 eager (no_grad)"
    skipped: dict[str, str] = {}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        variants = [baseline, "fp32 inference_mode", "bf16", "bf16 channels_last"]
        if not args.no_compile:
            variants += ["bf16 channels_last compile", "bf16 channels_last compile reduce-overhead"]
        plan = {1: (variants, 30 if args.quick else 100, 5), large: (variants, 10 if args.quick else 30, 3)}
    else:
        variants = [baseline, "fp32 inference_mode", "fp32 channels_last"]
        if cpu_has_bf16() or args.cpu_bf16:
            variants += ["bf16", "bf16 channels_last"]
        else:
            # Without native bf16 (AVX512-BF16 / AMX) autocast emulates it: measured on an AVX2-only EPYC, one
            # batch-1 call took minutes against ~12 s in fp32. Skipped unless --cpu-bf16.
            skipped["bf16"] = "CPU has no AVX512-BF16/AMX: emulated bf16 is >10x slower than fp32; --cpu-bf16 forces"
        if not args.no_compile:
            variants += ["fp32 compile"]
        plan = {1: (variants, 1 if args.quick else 2, 1)}
    results: dict[str, dict[str, dict]] = {}
    for batch, (names, iterations, warmup) in plan.items():
        for name in names:
            if device.type == "cpu" and name.startswith("bf16") and not cpu_has_bf16():
                # emulated bf16 is several times slower than fp32: one call shows it, more would cost minutes
                results.setdefault(f"batch {batch}", {})[name] = measure(name, device, batch, 1, 0)
            else:
                results.setdefault(f"batch {batch}", {})[name] = measure(name, device, batch, iterations, warmup)
            r = results[f"batch {batch}"][name]
            print(f"  batch {batch} {name}: {r['ms_per_image']:.1f} ms/image (first call {r['first_call_s']:.1f} s)",
                  flush=True)
    if device.type == "cpu":
        # the larger batch costs ~batch x a batch-1 call on CPU: only the baseline and the fastest setting, once
        ones = results["batch 1"]
        fastest = min((n for n in ones if n != baseline), key=lambda n: ones[n]["ms_per_image"])
        for name in dict.fromkeys([baseline, fastest]):
            results.setdefault(f"batch {large}", {})[name] = measure(name, device, large, 1, 0)
            r = results[f"batch {large}"][name]
            print(f"  batch {large} {name}: {r['ms_per_image']:.1f} ms/image", flush=True)
    for group in results.values():
        base = group[baseline]["ms_per_image"]
        for r in group.values():
            r["speedup_vs_fp32_eager"] = base / r["ms_per_image"]
    payload = {
        "config": {"model": "fcn8s width 1 (random weights)", "image": f"{WIDTH}x{HEIGHT}", "device": str(device),
                   "batches": list(plan) if device.type == "cuda" else [1, large], "quick": args.quick,
                   "note": "the output is argmax'd inside the timed call; on CPU the large batch runs once, "
                           "without warm-up, for the baseline and the fastest batch-1 setting only"},
        "results": results,
        "skipped_variants": skipped,
        "reference_points_not_ratios": REFERENCE_POINTS,
    }
    path = write_results("inference", payload, machine, started)

    fig, axes = new_figure(ncols=len(results), width=6.5)
    for ax, (group_name, group) in zip(axes, results.items()):
        names = list(group)
        bars = ax.barh(range(len(names)), [group[n]["ms_per_image"] for n in names])
        ax.set_yticks(range(len(names)), names)
        ax.bar_label(bars, labels=[f"{group[n]['ms_per_image']:.0f} ms ({group[n]['speedup_vs_fp32_eager']:.2f}x)"
                                   for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("ms per image (lower is better)")
        ax.set_title(f"FCN-8s {WIDTH}x{HEIGHT}, {group_name}, {device.type}")
    save_figure(fig, "inference")
    summary = []
    for group_name, group in results.items():
        best = max(group, key=lambda n: group[n]["speedup_vs_fp32_eager"])
        summary.append(f"{group_name}: fp32 eager {group[baseline]['ms_per_image']:.0f} ms/img, best '{best}' "
                       f"{group[best]['ms_per_image']:.0f} ms/img ({group[best]['speedup_vs_fp32_eager']:.2f}x)")
    print(f"inference ({device.type}): {'; '.join(summary)}; {path}")


if __name__ == "__main__":
    main()
