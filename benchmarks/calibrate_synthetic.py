"""Calibrate the synthetic dataset's difficulty for the quick start (a script, not a test).

Trains a width-0.25 FCN from scratch on the synthetic VOC-format data with a plain PyTorch loop (same transforms as
the real training path), for a fixed number of epochs, and records validation mean IoU and seconds per epoch.
The quick start must reach val mIoU >= 0.70 with FCN-8s in ~5-6 CPU minutes, and FCN-32s must stay clearly lower.

    python benchmarks/calibrate_synthetic.py --models fcn8s fcn32s --epochs 15 --out benchmarks/results/calib.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from fcnseg.data.classes import IGNORE_INDEX, NUM_CLASSES  # noqa: E402
from fcnseg.data.voc import VOCSegmentation  # noqa: E402
from fcnseg.metrics import confusion_matrix, metrics_from_confusion  # noqa: E402
from fcnseg.data.synthetic import write_synthetic_voc  # noqa: E402
from fcnseg.data.transforms import build_eval_transform, build_train_transform  # noqa: E402
from fcnseg.models import build_fcn  # noqa: E402


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, list[float]]:
    """Validation mean IoU and per-class IoU, from fcnseg's own confusion matrix and metrics."""
    model.eval()
    hist = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for image, mask in loader:
        hist += confusion_matrix(model(image).argmax(1), mask, NUM_CLASSES)
    metrics = metrics_from_confusion(hist)
    return float(metrics["mean_iou"]), metrics["per_class_iou"].tolist()


def train_one(name: str, root: Path, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    train_set = VOCSegmentation(
        root, "train", build_train_transform(args.crop, 0.75, 1.25, hflip=True, seed=args.seed)
    )
    val_set = VOCSegmentation(root, "val", build_eval_transform())
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed))
    val_loader = DataLoader(val_set, batch_size=16)
    model = build_fcn(name, width=args.width, backbone_weights=None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    curve, sec_per_epoch = [], []
    for epoch in range(1, args.epochs + 1):
        model.train()
        start = time.perf_counter()
        total = 0.0
        for image, mask in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(image), mask.long())  # the loaders keep masks uint8
            loss.backward()
            optimizer.step()
            total += loss.item()
        sec_per_epoch.append(time.perf_counter() - start)
        miou, per_class = evaluate(model, val_loader)
        curve.append(miou)
        print(f"{name} lr={args.lr} epoch {epoch}: loss {total / len(train_loader):.3f} val mIoU {miou:.3f} "
              f"({sec_per_epoch[-1]:.1f} s/epoch)", flush=True)
    return {"model": name, "lr": args.lr, "miou": curve, "sec_per_epoch": sec_per_epoch,
            "final_per_class_iou": per_class}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fcn8s", "fcn32s"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", type=Path, default=Path("data/synthetic-calibration/VOC2012"))
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--size", type=int, default=96, help="synthetic image height and width")
    parser.add_argument("--drawing", type=json.loads, default={}, help='JSON overrides, e.g. {"noise_std": 12}')
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/calibrate_synthetic.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    root = write_synthetic_voc(args.data_root, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                               height=args.size, width=args.size, **args.drawing)
    print(f"data ready in {time.perf_counter() - start:.1f} s: {root}", flush=True)
    results = [train_one(name, root, args) for name in args.models]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for run in results:
        print(f"{run['model']}: final mIoU {run['miou'][-1]:.3f}, best {max(run['miou']):.3f}, "
              f"{np.mean(run['sec_per_epoch']):.1f} s/epoch")


if __name__ == "__main__":
    main()
