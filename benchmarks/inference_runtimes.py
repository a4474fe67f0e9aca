"""CPU inference runtimes as ``fcnseg predict`` runs them: PyTorch fp32 eager (the baseline), PyTorch bf16 autocast +
channels_last (only where the CPU has AMX / AVX512-BF16, unless ``--emulated-bf16``), and onnxruntime fp32.

    python benchmarks/inference_runtimes.py [--width 0.25] [--quick] [--threads N]

FCN-8s with random weights (speed does not depend on them) at 500x375, batch 1 and 8, through the real
``fcnseg.inference.Segmenter`` / ``fcnseg.export.OnnxRuntimeSegmenter`` (normalisation included). Each path's
argmax agreement with fp32 eager is measured on the same random-score net. Ratios are against fp32 eager in the
same run. Which path ``--runtime auto`` picks on this machine is recorded with the CPU's flags.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bar_plot, machine_info, parse_args, summarize, time_repeats, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HEIGHT, WIDTH = 375, 500


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--width", type=float, default=0.25, help="channel width multiplier (1 = the paper's net)"),
        p.add_argument("--emulated-bf16", action="store_true", help="also time bf16 on a CPU without native bf16"),
    ))
    started = time.perf_counter()
    machine = machine_info()
    from fcnseg.export import OnnxRuntimeSegmenter
    from fcnseg.inference import BF16_CPU_FLAGS, Segmenter, cpu_flags, cpu_has_native_bf16
    from fcnseg.models import build_fcn
    from fcnseg.runtime import choose_runtime

    torch.manual_seed(0)
    net = build_fcn("fcn8s", num_classes=21, width=args.width).eval()
    with torch.no_grad():  # random score layers: label maps with boundaries, so agreement means something
        for name, param in net.named_parameters():
            if name.startswith("score"):
                param.copy_(torch.randn_like(param) if name.endswith("weight") else torch.zeros_like(param))
    native = cpu_has_native_bf16()
    paths = {"fp32 eager": lambda: Segmenter(net, "imagenet", device="cpu", precision="fp32", channels_last=False)}
    if native or args.emulated_bf16:
        paths["bf16 + channels_last"] = lambda: Segmenter(net, "imagenet", device="cpu", precision="bf16",
                                                          channels_last=True)
    paths["onnxruntime fp32"] = lambda: OnnxRuntimeSegmenter(
        Segmenter(net, "imagenet", device="cpu", precision="fp32", channels_last=False), threads=args.threads)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(8)]
    repeats = 2 if args.quick else 5
    results: dict[str, dict] = {}
    reference = None
    for name, make in paths.items():
        segmenter = make()
        labels = segmenter.predict_batch(images[:2])
        reference = reference if reference is not None else labels
        agreement = float(np.mean([(a == b).mean() for a, b in zip(labels, reference)]))
        row = {"argmax_agreement_vs_fp32": agreement}
        for batch in (1, 8):
            times = time_repeats(lambda: segmenter.predict_batch(images[:batch]), repeats if batch == 1 else
                                 max(1, repeats // 2), warmup=1)
            row[f"batch{batch}"] = {**summarize(times), "ms_per_image": summarize(times)["median_s"] / batch * 1e3}
        results[name] = row
        print(f"{name:>22}: batch 1 {row['batch1']['ms_per_image']:.0f} ms/img, batch 8 "
              f"{row['batch8']['ms_per_image']:.0f} ms/img, agreement {agreement:.5f}", flush=True)
    base = results["fp32 eager"]
    for row in results.values():
        for batch in (1, 8):
            row[f"speedup_batch{batch}_vs_fp32_eager"] = (base[f"batch{batch}"]["ms_per_image"]
                                                          / row[f"batch{batch}"]["ms_per_image"])
    flags = cpu_flags()
    payload = {
        "net": f"fcn8s width {args.width}", "image": f"{WIDTH}x{HEIGHT}", "threads": torch.get_num_threads(),
        "cpu_bf16_flags": sorted(flags & set(BF16_CPU_FLAGS)), "cpu_has_avx512f": "avx512f" in flags,
        "cpu_has_avx2": "avx2" in flags, "native_bf16": native,
        "auto_runtime_here": choose_runtime("auto", torch.device("cpu")),
        "bf16_note": None if native or args.emulated_bf16 else
        "not timed: this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated, >10x slower)",
        "results": results,
    }
    path = write_results("inference_runtimes", payload, machine, started)
    labels = [f"{name}\nb{batch}" for name in results for batch in (1, 8)]
    values = [results[name][f"speedup_batch{batch}_vs_fp32_eager"] for name in results for batch in (1, 8)]
    bar_plot("inference_runtimes", labels, values, "speed-up vs fp32 eager (same batch)",
             f"FCN-8s width {args.width}, {WIDTH}x{HEIGHT}, CPU")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
