"""The evaluate stage scores a held-out split next to val when the data has one (the synthetic `test` split)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fcnseg import pipeline
from fcnseg.evaluate import evaluate_checkpoint
from tests.test_inference import write_tiny_checkpoint

CONF = Path(__file__).resolve().parents[1] / "conf"


def _params(data_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=[
            "experiment=quickstart", f"paths.data_dir={data_dir}", "tracking.enabled=false",
            "data.synthetic.num_train=4", "data.synthetic.num_val=3", "data.synthetic.num_test=5",
            "data.synthetic.height=40", "data.synthetic.width=48", *overrides,
        ])


def _run_evaluate(cfg, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(workdir)  # the stages use paths relative to the project root
    pipeline.prepare(cfg)
    write_tiny_checkpoint(workdir / pipeline.BEST_CHECKPOINT)
    pipeline.evaluate(cfg)
    return json.loads((workdir / pipeline.METRICS_FILE).read_text())


def test_metrics_json_has_val_at_the_top_and_the_held_out_test_split(tmp_path, monkeypatch):
    cfg = _params(tmp_path / "data")
    metrics = _run_evaluate(cfg, tmp_path, monkeypatch)
    root, checkpoint = cfg.data.root, tmp_path / pipeline.BEST_CHECKPOINT
    val = evaluate_checkpoint(checkpoint, root, "val", device="cpu").summary()
    test = evaluate_checkpoint(checkpoint, root, "test", device="cpu").summary()
    assert metrics["mean_iou"] == pytest.approx(val["mean_iou"])  # the registry gate reads val here
    assert set(metrics["test"]) == set(test)
    for key in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"):
        assert metrics["test"][key] == pytest.approx(test[key])
    assert metrics["test"] != {k: v for k, v in metrics.items() if k != "test"}  # another split, another score


def test_no_test_split_no_test_entry(tmp_path, monkeypatch):
    metrics = _run_evaluate(_params(tmp_path / "data", "data.test_split=null"), tmp_path, monkeypatch)
    assert "test" not in metrics and "mean_iou" in metrics
