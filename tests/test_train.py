"""Training for real through the Hydra entry point: checkpoints, MLflow run contents, sweeps."""

from __future__ import annotations

import json
import subprocess

import mlflow
import pytest

from tests.tiny import ROOT, subprocess_env, tiny_overrides, train_command, train_in_process


def run_training(overrides, timeout=600):
    result = subprocess.run(train_command(overrides), cwd=ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.fresh_mlflow_store  # a user's first run: training creates and migrates the store itself
def test_training_run_checkpoints_and_records_everything_in_mlflow(tmp_path):
    trained = run_training(tiny_overrides(tmp_path, epochs=2))
    output = trained.stdout + trained.stderr
    assert output.count("Seed set to") == 1 and output.count("GPU available:") == 1  # each message printed once
    out = tmp_path / "out"
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    result = json.loads((out / "train_result.json").read_text())
    assert 0.0 <= result["best_score"] <= 1.0 and result["model_uri"]

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "fcnseg-quickstart"
    # the full resolved config, flattened
    assert run.data.params["model.net.name"] == "fcn8s" and run.data.params["data.synthetic.height"] == "48"
    # tags: model variant, data version, git commit
    assert run.data.tags["model"] == "fcn8s" and run.data.tags["data_version"]
    assert run.data.tags.get("mlflow.source.git.commit")
    # per-epoch curves of the paper's four metrics, both stages, plus per-class IoU
    for key in ("train/loss_step", "train/loss_epoch", "val/loss", "val/pixel_acc", "val/mean_acc", "val/mean_iou", "val/fw_iou",
                "train/mean_iou"):
        history = client.get_metric_history(run.info.run_id, key)
        assert history, key
    assert len(client.get_metric_history(run.info.run_id, "val/mean_iou")) == 2
    assert any(key.startswith("val/iou/") for key in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "evaluation"} <= artifacts
    assert "checkpoints" not in artifacts  # the logged model carries the weights: they are not logged twice
    assert run.data.tags["git_commit"] and run.data.tags["git_dirty"] in ("true", "false")
    contexts = {next(t.value for t in i.tags if t.key == "mlflow.data.context") for i in run.inputs.dataset_inputs}
    assert contexts == {"training", "validation"}  # lineage: the dataset, via mlflow.log_input
    assert run.data.tags["mlflow.note.content"].startswith("fcn8s trained on synthetic `train`")  # description
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/per_class_iou.png", "evaluation/predictions.png",
            "evaluation/per_class_iou.json"} <= evaluation
    # the logged MLflow model loads and segments an image of any size
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(result["model_uri"])
    from fcnseg.serving import decode_label_map, encode_image
    import numpy as np
    import pandas as pd

    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    out_frame = model.predict(pd.DataFrame({"image": [encode_image(image)]}))
    assert decode_label_map(out_frame["mask"][0]).shape == (37, 53)


@pytest.mark.slow
def test_multirun_sweep_trains_each_model(tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path, epochs=1, tracking=False)
                 if not o.startswith(("model=", "paths.output_dir="))]
    run_training(["-m", "model=fcn32s,fcn16s", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides])
    for index, name in enumerate(("fcn32s", "fcn16s")):
        run_dir = tmp_path / "sweep" / str(index)
        assert (run_dir / "checkpoints" / "best.ckpt").is_file()
        assert f"name: {name}" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_staged_training_initialises_fcn16s_from_fcn32s(tmp_path):
    import torch

    # in-process: what is tested is the initialisation, not the entry point (the tests above run that)
    train_in_process(tiny_overrides(tmp_path / "s32", epochs=1, model="fcn32s", tracking=False))
    coarse = tmp_path / "s32" / "out" / "checkpoints" / "best.ckpt"
    train_in_process(tiny_overrides(tmp_path / "s16", epochs=1, model="fcn16s", tracking=False)
                     + [f"model.init_from={coarse}", "optim.lr=1e-12", "optim.bias_lr_mult=1"])
    coarse_state = torch.load(coarse, weights_only=True)["state_dict"]
    fine_state = torch.load(tmp_path / "s16" / "out" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    # with a vanishing learning rate, the shared layers still hold the FCN-32s weights
    assert torch.allclose(fine_state["net.conv1_1.weight"], coarse_state["net.conv1_1.weight"], atol=1e-6)
    assert torch.allclose(fine_state["net.score_fr.weight"], coarse_state["net.score_fr.weight"], atol=1e-6)
