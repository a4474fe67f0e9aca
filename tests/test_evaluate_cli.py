"""``fcnseg evaluate`` as a subprocess on a VOC-layout split: the four metrics, per-class table, metrics.json, plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fcnseg.data import VOCSegmentation
from fcnseg.data.classes import VOC_CLASSES
from fcnseg.inference import Segmenter
from fcnseg.metrics import SegmentationMetrics
from tests.test_inference import single_thread, single_thread_env, write_tiny_checkpoint  # noqa: F401

METRICS = ("pixel_acc", "mean_acc", "mean_iou", "fw_iou")


def test_evaluate_prints_and_writes_the_metrics_of_an_in_process_computation(
        tmp_path: Path, voc_root: Path, single_thread: None) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "x.ckpt")
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "fcnseg.cli", "evaluate", "--model", str(checkpoint), "--data", str(voc_root),
         "--split", "val", "--out", str(out), "--device", "cpu", "--num-overlays", "2"],
        cwd=tmp_path, env=single_thread_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
    metric = SegmentationMetrics(len(VOC_CLASSES))
    dataset = VOCSegmentation(voc_root, "val")
    for index in range(len(dataset)):
        image, mask = dataset[index]
        metric.update(torch.from_numpy(segmenter.predict(image))[None].long(), torch.from_numpy(mask)[None].long())
    expected = metric.compute()

    written = json.loads((out / "metrics.json").read_text())
    for key in METRICS:
        assert written[key] == pytest.approx(float(expected[key]), abs=1e-6), key
        assert f"{key} {float(expected[key]):.4f}" in result.stdout  # the four metrics, printed
    for name, iou in zip(VOC_CLASSES, expected["per_class_iou"].tolist()):
        if iou != iou:  # class absent from labels and predictions
            assert written["per_class_iou"][name] is None
        else:
            assert written["per_class_iou"][name] == pytest.approx(iou, abs=1e-6), name
        assert any(line.split()[:1] == [name] for line in result.stdout.splitlines()), name  # per-class table
    for plot in ("confusion_matrix.png", "per_class_iou.png"):
        with Image.open(out / plot) as png:
            assert png.size[0] > 100 and png.size[1] > 100, plot
    assert 0.0 < written["pixel_acc"] < 1.0


def test_evaluate_unknown_split_is_one_error_line(tmp_path: Path, voc_root: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from fcnseg.cli import main

    checkpoint = write_tiny_checkpoint(tmp_path / "x.ckpt")
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--model", str(checkpoint), "--data", str(voc_root), "--split", "nosuchsplit",
              "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nosuchsplit" in lines[0], lines
