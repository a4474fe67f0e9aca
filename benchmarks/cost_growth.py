"""How FCN-8s inference time grows with image size on CPU (batch 1, eval, ``torch.inference_mode``).

    python benchmarks/cost_growth.py [--quick]

Fits ``time = a + b * pixels`` per width and reports the fixed cost ``a``, the slope and R². The paper's 100-pixel
padding of ``conv1_1`` means the net really sees ``(H + 198) x (W + 198)`` pixels after ``conv1_1``, so even a
1x1 input costs about what a ~200x200 image would cost without padding; the 1x1 time is measured explicitly and
times are the fastest of a few calls (least disturbed by other jobs); a second fit against padded pixels shows how much of the fixed cost the padding explains. The baseline of the
ratios is the 1x1 input of the same width, measured in the same run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, new_figure, parse_args, save_figure, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

PAD = 100  # conv1_1 padding: the 3x3 conv's output is (H + 2*PAD - 2) x (W + 2*PAD - 2)


def time_forward(net: torch.nn.Module, size: int, repeats: int) -> float:
    """Fastest of ``repeats`` calls: on a shared machine the minimum is the least disturbed measurement."""
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        net(x)  # warm-up: oneDNN primitives are built per shape
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
    return min(times)


def linear_fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    slope, intercept = np.polyfit(x, y, 1)
    predicted = intercept + slope * x
    r2 = 1 - float(np.sum((y - predicted) ** 2) / np.sum((y - y.mean()) ** 2))
    return {"a_fixed_s": float(intercept), "b_s_per_pixel": float(slope), "r2": r2}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    from fcnseg.models import build_fcn

    started = time.perf_counter()
    machine = machine_info()
    if args.quick:
        plan = {0.25: ([64, 128, 256, 384], 2), 1.0: ([128, 256], 1)}
    else:
        plan = {0.25: ([64, 128, 192, 256, 320, 384, 448, 512], 5), 1.0: ([128, 256, 384, 512], 2)}
    results = {}
    for width, (sizes, repeats) in plan.items():
        torch.manual_seed(0)
        net = build_fcn("fcn8s", num_classes=21, width=width).eval()
        one = time_forward(net, 1, repeats)
        times = [time_forward(net, size, repeats) for size in sizes]
        for size, t in zip(sizes, times):
            print(f"  width {width} {size}x{size}: {t * 1e3:.1f} ms", flush=True)
        pixels = np.array([s * s for s in sizes], dtype=float)
        padded = np.array([(s + 2 * PAD - 2) ** 2 for s in sizes], dtype=float)
        y = np.array(times)
        fit = linear_fit(pixels, y)
        fit_padded = linear_fit(padded, y)
        # the unpadded image size whose fitted cost equals the 1x1 input's
        # (None when the 1x1 time is below the fitted intercept: the fit is then only valid over the sizes measured)
        equivalent = float(np.sqrt((one - fit["a_fixed_s"]) / fit["b_s_per_pixel"])) \
            if fit["b_s_per_pixel"] > 0 and one > fit["a_fixed_s"] else None
        results[f"width {width}"] = {
            "sizes": sizes, "seconds": times, "repeats": repeats,
            "one_by_one_s": one,
            "ratio_vs_1x1": [t / one for t in times],
            "fit_vs_input_pixels": fit,
            "fit_vs_padded_pixels": fit_padded,
            "fixed_cost_share_at_largest": fit["a_fixed_s"] / times[-1],
            "1x1_costs_like_square_of_side": equivalent,
        }
        print(f"  width {width} 1x1: {one * 1e3:.1f} ms; fit a={fit['a_fixed_s'] * 1e3:.1f} ms, "
              f"R²={fit['r2']:.4f}", flush=True)
    payload = {"config": {"model": "fcn8s", "batch": 1, "mode": "eval, inference_mode, fp32",
                          "quick": args.quick, "padding": PAD}, "results": results}
    path = write_results("cost_growth", payload, machine, started)

    fig, axes = new_figure(ncols=len(results))
    for ax, (name, r) in zip(axes, results.items()):
        pixels = np.array([s * s for s in r["sizes"]], dtype=float)
        ax.plot(pixels / 1e3, np.array(r["seconds"]) * 1e3, "o", label="measured")
        xs = np.linspace(0, pixels.max(), 50)
        fit = r["fit_vs_input_pixels"]
        ax.plot(xs / 1e3, (fit["a_fixed_s"] + fit["b_s_per_pixel"] * xs) * 1e3, "-",
                label=f"a + b·pixels (a={fit['a_fixed_s'] * 1e3:.0f} ms, R²={fit['r2']:.3f})")
        ax.plot([0.001], [r["one_by_one_s"] * 1e3], "rs", label=f"1x1 input: {r['one_by_one_s'] * 1e3:.0f} ms")
        ax.set_xlabel("input pixels (thousands)")
        ax.set_ylabel("ms per image (batch 1)")
        ax.set_title(f"FCN-8s {name}, CPU")
        ax.set_xlim(left=-5)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    save_figure(fig, "cost_growth")
    parts = [f"{name}: 1x1 {r['one_by_one_s'] * 1e3:.0f} ms, fixed a={r['fit_vs_input_pixels']['a_fixed_s'] * 1e3:.0f}"
             f" ms, {r['sizes'][-1]}² = {r['ratio_vs_1x1'][-1]:.1f}x the 1x1 time, R²="
             f"{r['fit_vs_input_pixels']['r2']:.3f}" for name, r in results.items()]
    print(f"cost_growth: {'; '.join(parts)}; {path}")


if __name__ == "__main__":
    main()
