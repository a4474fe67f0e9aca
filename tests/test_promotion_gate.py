"""The promotion gate compares like with like (evaluation set = data version + split + image ids), guards every
class, and writes its decision and per-class deltas on the version; versions carry lineage and a model card.
Real SQLite MLflow stores in tmp dirs, the real ``fcnseg`` CLI in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from fcnseg import lineage, registry
from tests.test_registry import Echo

CLASSES = ("background", "aeroplane", "cat", "dog")


def write_voc_layout(root: Path, splits: dict[str, list[str]]) -> Path:
    """The VOC directory layout with empty image/label files (the evaluation set only reads the split lists)."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for image_id in ids:
            (root / "JPEGImages" / f"{image_id}.jpg").touch()
            (root / "SegmentationClass" / f"{image_id}.png").touch()
    return root


@pytest.fixture
def store(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("gate-tests")
    with mlflow.start_run() as run:
        mlflow.set_tags({"git_commit": "a" * 40, "git_dirty": "false"})
        mlflow.log_params({"model.name": "fcn8s", "optim.lr": "0.001", "trainer.max_epochs": "3"})
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
    yield {"uri": uri, "client": registry.client_for(uri), "model_uri": info.model_uri, "run_id": run.info.run_id}
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


def add(store, iou: float, evaluation: dict, per_class: dict | None = None, **kwargs) -> int:
    version = registry.register_model(
        store["model_uri"], "fcn-gate", val_mean_iou=iou, data_version=evaluation["data_version"],
        client=store["client"], evaluation=evaluation,
        per_class_iou=per_class if per_class is not None else dict.fromkeys(CLASSES, iou), **kwargs)
    return int(version.version)


def version_tags(store, version: int) -> dict:
    return store["client"].get_model_version("fcn-gate", str(version)).tags


def cli(store, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, "-m", "fcnseg.cli", *args, "--tracking-uri", store["uri"]],
                          capture_output=True, text=True, env=env, timeout=120)


def test_same_folder_other_split_is_not_the_same_evaluation_set(tmp_path: Path, store) -> None:
    # data=voc scores on val, data=voc_sbd on seg11valid: one VOC2012 folder, so one data version, other images
    root = write_voc_layout(tmp_path / "VOC2012", {"val": ["2008_000001", "2008_000002", "2008_000003"],
                                                   "seg11valid": ["2008_000002", "2008_000001"]})
    on_val = lineage.evaluation_set(root, "val", "same-folder")
    on_seg11 = lineage.evaluation_set(root, "seg11valid", "same-folder")
    assert on_val["data_version"] == on_seg11["data_version"]
    assert on_val["eval_ids_sha256"] != on_seg11["eval_ids_sha256"] and on_seg11["eval_num_images"] == "2"
    # the id hash is the sorted id list's: the order of the split file does not matter, the ids do
    (root / "ImageSets" / "Segmentation" / "val_shuffled.txt").write_text("2008_000003\n2008_000001\n2008_000002\n")
    assert lineage.evaluation_set(root, "val_shuffled", "same-folder")["eval_ids_sha256"] == on_val["eval_ids_sha256"]

    v1 = add(store, 0.60, on_val)
    assert registry.promote("fcn-gate", v1, client=store["client"]).promoted
    v2 = add(store, 0.90, on_seg11)  # far better, but on other images
    refused = cli(store, "promote", "fcn-gate", str(v2))
    assert refused.returncode == 0, refused.stderr
    assert refused.stdout.startswith(f"refused: v{v2} was evaluated on data same-folder, split seg11valid")
    assert "not the same evaluation set" in refused.stdout
    assert int(store["client"].get_model_version_by_alias("fcn-gate", "champion").version) == v1
    assert version_tags(store, v2)["promotion_decision"] == "refused"

    v3 = add(store, 0.61, lineage.evaluation_set(root, "val", "same-folder"))  # v1's evaluation set
    assert registry.promote("fcn-gate", v3, client=store["client"]).promoted

    forced = cli(store, "promote", "fcn-gate", str(v2), "--force")
    assert forced.returncode == 0 and "(forced)" in forced.stdout
    tags = version_tags(store, v2)
    assert (tags["promotion_forced"], tags["promotion_decision"]) == ("true", "promoted")


def test_per_class_guard_refuses_a_better_mean_with_a_class_collapse(tmp_path: Path, store) -> None:
    evaluation = {"data_version": "d1", "eval_split": "val", "eval_ids_sha256": "f" * 64}
    base = {"background": 0.90, "aeroplane": 0.50, "cat": 0.40, "dog": 0.40}
    v1 = add(store, 0.55, evaluation, base)
    registry.promote("fcn-gate", v1, client=store["client"])
    # mean IoU up by 2.5 points, but cat loses 6 points
    worse_cat = {"background": 0.95, "aeroplane": 0.60, "cat": 0.34, "dog": 0.41}
    v2 = add(store, 0.575, evaluation, worse_cat)
    result = cli(store, "promote", "fcn-gate", str(v2))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("refused: val mIoU 0.5750 > 0.5500") and "cat -0.0600" in lines[0]
    assert lines[1] == f"per-class IoU change, v{v2} - v{v1}:"
    assert any(line.split() == ["cat", "-0.0600"] for line in lines[2:])
    assert any(line.split() == ["aeroplane", "+0.1000"] for line in lines[2:])
    tags = version_tags(store, v2)
    assert tags["promotion_decision"] == "refused" and float(tags["iou_delta.cat"]) == pytest.approx(-0.06)
    assert float(tags["iou_delta.background"]) == pytest.approx(0.05) and tags["per_class_margin"] == "0.05"
    assert int(store["client"].get_model_version_by_alias("fcn-gate", "champion").version) == v1

    # a looser margin, given on the command line, lets the same version through
    looser = cli(store, "promote", "fcn-gate", str(v2), "--per-class-margin", "0.1")
    assert looser.stdout.startswith(f"promoted fcn-gate v{v2} to champion"), looser.stdout + looser.stderr
    assert version_tags(store, v2)["per_class_margin"] == "0.1"

    # a drop within the margin (4 points) is accepted when the mean rises
    small_drop = {"background": 0.96, "aeroplane": 0.62, "cat": 0.30, "dog": 0.45}
    v3 = add(store, 0.5825, evaluation, small_drop)
    assert registry.promote("fcn-gate", v3, client=store["client"]).promoted

    bad = cli(store, "promote", "fcn-gate", str(v3), "--per-class-margin", "5")
    assert bad.returncode == 2 and bad.stderr.startswith("error: per-class margin must be")


def test_without_per_class_iou_the_guard_refuses_unless_forced(store) -> None:
    evaluation = {"data_version": "d1", "eval_split": "val", "eval_ids_sha256": "e" * 64}
    v1 = add(store, 0.5, evaluation)
    registry.promote("fcn-gate", v1, client=store["client"])
    v2 = add(store, 0.6, evaluation)
    store["client"].delete_model_version_tag("fcn-gate", str(v2), "per_class_iou")
    decision = registry.promote("fcn-gate", v2, client=store["client"])
    assert not decision.promoted and "per-class guard cannot run" in decision.reason


def test_version_lineage_model_card_and_models_listing(tmp_path: Path, store) -> None:
    root = write_voc_layout(tmp_path / "VOC2012", {"val": ["a", "b"]})
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  train:\n    cmd: python -m fcnseg.pipeline train\n"
        "    outs:\n    - path: artifacts/train\n      md5: 0123456789abcdef.dir\n")
    dvc = lineage.dvc_lock_hashes(tmp_path)
    assert dvc == {"dvc_lock.train": "artifacts/train:0123456789abcdef.dir"}
    version = add(store, 0.5, lineage.evaluation_set(root, "val", "d1"), lineage=dvc)
    tags = version_tags(store, version)
    assert (tags["git_commit"], tags["git_dirty"]) == ("a" * 40, "false")  # copied from the run
    assert tags["dvc_lock.train"] == "artifacts/train:0123456789abcdef.dir"
    assert store["client"].get_run(store["run_id"]).data.tags["dvc_lock.train"] == tags["dvc_lock.train"]

    description = store["client"].get_model_version("fcn-gate", str(version)).description
    for section in ("# fcn-gate v", "## Data and evaluation set", "## Metrics", "## Recipe", "## Lineage",
                    "## Intended use and limits"):
        assert section in description, section
    assert "| cat | 0.5000 |" in description and "`optim.lr` = `0.001`" in description
    assert f"split: `val` (2 images, ids sha256 `{tags['eval_ids_sha256']}`)" in description
    card = mlflow.artifacts.load_text(f"runs:/{store['run_id']}/model_card/fcn-gate-v{version}.md")
    assert card == description
    assert store["client"].get_run(store["run_id"]).data.tags["mlflow.note.content"] == card  # run description

    listing = cli(store, "models", "fcn-gate")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.split()[0] == str(version))
    assert "challenger" in row and "val (" in row and "a" * 12 in row
    assert "dvc.lock train: artifacts/train:0123456789abcdef.dir" in listing.stdout


def test_run_lineage_datasets_are_logged_inputs(tmp_path: Path, store) -> None:
    from omegaconf import OmegaConf

    root = write_voc_layout(tmp_path / "VOC2012", {"train": ["t1", "t2", "t3"], "val": ["v1"]})
    (tmp_path / "data.dvc").write_text(
        "frozen: true\ndeps:\n- path: http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar\n"
        "outs:\n- md5: 6cd6e144f989b92b3379bac3b3de84fd\n  path: data/downloads/VOCtrainval_11-May-2012.tar\n")
    data_cfg = OmegaConf.create({"name": "voc2012", "source": "voc", "root": str(root)})
    lineage.log_datasets(store["run_id"], data_cfg, tmp_path, {"training": "train", "validation": "val"})
    inputs = store["client"].get_run(store["run_id"]).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in inputs}
    assert set(by_context) == {"training", "validation"}
    train = by_context["training"]
    assert train.dataset.name == "voc2012/train"
    assert json.loads(train.dataset.source)["url"].endswith("/VOCtrainval_11-May-2012.tar")
    tags = {t.key: t.value for t in train.tags}
    assert tags["md5"] == "6cd6e144f989b92b3379bac3b3de84fd" and tags["split"] == "train"
    assert tags["ids_sha256"] == lineage.ids_digest(["t1", "t2", "t3"])

    add(store, 0.5, lineage.evaluation_set(root, "val", "d1"))  # `fcnseg models` shows the version's datasets
    listing = cli(store, "models", "fcn-gate")
    assert listing.returncode == 0, listing.stderr
    assert ("dataset training: voc2012/train from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
            "VOCtrainval_11-May-2012.tar (MD5 6cd6e144f989b92b3379bac3b3de84fd)") in listing.stdout


def test_pipeline_register_stage_records_the_evaluation_set_and_prints_deltas(tmp_path: Path, store, monkeypatch,
                                                                              capsys) -> None:
    from omegaconf import OmegaConf

    from fcnseg import pipeline

    root = write_voc_layout(tmp_path / "data" / "VOC2012", {"val": ["a", "b", "c"]})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  evaluate:\n    outs:\n"
                                       "    - path: plots\n      md5: feedbeef.dir\n")
    train_dir = tmp_path / pipeline.TRAIN_DIR
    train_dir.mkdir(parents=True)
    (train_dir / "train_result.json").write_text(json.dumps({"model_uri": store["model_uri"]}))
    (train_dir / "mlflow_run.json").write_text(json.dumps({"run_id": store["run_id"], "tracking_uri": store["uri"]}))
    cfg = OmegaConf.create({"tracking": {"enabled": True, "registered_model_name": "fcn-pipe"},
                            "model": {"name": "fcn8s"}, "data": {"root": str(root), "datamodule": {"val_split": "val"}}})
    per_class = [{"background": 0.9, "cat": 0.5}, {"background": 0.99, "cat": 0.42}]  # mean up, cat -0.08
    for mean_iou, table in zip((0.7, 0.705), per_class):
        (tmp_path / "metrics.json").write_text(json.dumps({"mean_iou": mean_iou, "per_class_iou": table}))
        pipeline.register(cfg)
    out = capsys.readouterr().out
    assert "refused: val mIoU 0.7050 > 0.7000 (v1), but IoU drops by more than 0.0500 for cat -0.0800" in out
    assert "per-class IoU change, v2 - v1:" in out
    tags = store["client"].get_model_version("fcn-pipe", "2").tags
    assert (tags["eval_split"], tags["eval_num_images"]) == ("val", "3")
    assert tags["eval_ids_sha256"] == lineage.ids_digest(["a", "b", "c"])
    assert tags["dvc_lock.evaluate"] == "plots:feedbeef.dir" and tags["git_commit"] == "a" * 40
    assert json.loads(tags["per_class_iou"]) == per_class[1]
    assert json.loads((tmp_path / pipeline.REGISTER_FILE).read_text())["promoted"] is False
