"""Mean IoU with and without test-time augmentation on a VOC-layout split, and what it costs.

    python benchmarks/tta_eval.py --checkpoint artifacts/train/checkpoints/best.ckpt \
        --data data/synthetic/VOC2012 --split test [--tta none flip mmseg] [--threads N]

Each setting evaluates the whole split through ``fcnseg.evaluate.evaluate_checkpoint`` (the DVC stage's path, on
PyTorch fp32 CPU); the cost ratio is wall time against ``none`` in the same run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, parse_args, write_results  # noqa: E402


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--checkpoint", required=True),
        p.add_argument("--data", required=True),
        p.add_argument("--split", default="test"),
        p.add_argument("--tta", nargs="+", default=["none", "flip", "mmseg"]),
    ))
    started = time.perf_counter()
    machine = machine_info()
    from fcnseg.evaluate import evaluate_checkpoint

    rows = {}
    for name in args.tta:
        begin = time.perf_counter()
        report = evaluate_checkpoint(args.checkpoint, args.data, args.split, device="cpu", tta=name)
        summary = report.summary()
        rows[name] = {"mean_iou": summary["mean_iou"], "pixel_acc": summary["pixel_acc"],
                      "wall_s": time.perf_counter() - begin}
        print(f"{name:>6}: mean IoU {summary['mean_iou']:.4f}  pixel acc {summary['pixel_acc']:.4f}  "
              f"{rows[name]['wall_s']:.1f} s", flush=True)
    base = rows.get("none")
    if base:
        for row in rows.values():
            row["mean_iou_change_vs_none"] = row["mean_iou"] - base["mean_iou"]
            row["cost_ratio_vs_none"] = row["wall_s"] / base["wall_s"]
    payload = {"checkpoint": args.checkpoint, "data": args.data, "split": args.split, "results": rows}
    print(f"wrote {write_results('tta_synthetic', payload, machine, started)}")


if __name__ == "__main__":
    main()
