"""The DVC register stage registers a training run's model once: re-run with the same run and the same evaluation
(e.g. after only the overlay count changed), it finds the version and adds none; a new score is a new version."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from fcnseg import pipeline
from tests.test_promotion_gate import store, write_voc_layout  # noqa: F401  (fixture)


def test_the_register_stage_is_idempotent_for_one_run_and_one_evaluation(tmp_path: Path, store, monkeypatch,
                                                                          capsys):
    root = write_voc_layout(tmp_path / "data" / "VOC2012", {"val": ["a", "b"]})
    monkeypatch.chdir(tmp_path)
    train_dir = tmp_path / pipeline.TRAIN_DIR
    train_dir.mkdir(parents=True)
    (train_dir / "train_result.json").write_text(json.dumps({"model_uri": store["model_uri"]}))
    (train_dir / "mlflow_run.json").write_text(json.dumps({"run_id": store["run_id"], "tracking_uri": store["uri"]}))
    cfg = OmegaConf.create({"tracking": {"enabled": True, "registered_model_name": "fcn-once"},
                            "model": {"name": "fcn8s"}, "data": {"root": str(root), "datamodule": {"val_split": "val"}}})
    metrics = {"mean_iou": 0.5, "per_class_iou": {"background": 0.5}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    pipeline.register(cfg)
    pipeline.register(cfg)  # re-run: the same run, the same evaluation
    client = store["client"]
    assert [str(v.version) for v in client.search_model_versions("name='fcn-once'")] == ["1"]
    assert "not registered again" in capsys.readouterr().out
    assert json.loads((tmp_path / pipeline.REGISTER_FILE).read_text())["version"] == 1

    (tmp_path / "metrics.json").write_text(json.dumps({**metrics, "mean_iou": 0.6}))  # a new claim about it
    pipeline.register(cfg)
    assert sorted(str(v.version) for v in client.search_model_versions("name='fcn-once'")) == ["1", "2"]
