"""After training, and for runs made elsewhere: what goes into an MLflow run besides its curves. The evaluation
reports (plots, per-class IoU, prediction grid), the self-contained MLflow model, lineage (git, datasets), imported
weights as models of their own. Takes explicit paths: the run dir's layout is :mod:`fcnseg.run_dir`'s.

Makes no collective call: under DDP, rank 0 runs it alone after the others have finished.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf

from fcnseg import lineage, registry
from fcnseg.data.layouts import open_split
from fcnseg.evaluate import EvaluationReport, evaluate_checkpoint, write_reports
from fcnseg.metrics import SCALAR_KEYS
from fcnseg.runs import (
    check_reachable, experiment_id, project_root, resolve_tracking_uri, using_store,
)
from fcnseg.serving import log_pyfunc_model


def log_evaluation(client, run_id: str, report: EvaluationReport, prefix: str = "val",
                   artifact_dir: str = "evaluation") -> None:
    """The evaluation's reports (the files ``write_reports`` makes for DVC: metrics, confusion matrix and per-class
    IoU plots and tables, prediction grid) as run artifacts, and its four metrics as ``<prefix>_best/*``."""
    with tempfile.TemporaryDirectory() as tmp:
        write_reports(report, Path(tmp) / "metrics.json", tmp)
        client.log_artifacts(run_id, tmp, artifact_dir)
    for key in SCALAR_KEYS:
        client.log_metric(run_id, f"{prefix}_best/{key}", float(report.results[key]))


def log_training_outputs(cfg: DictConfig, run_id: str, best_checkpoint: Path, evaluate: bool = True) -> str:
    """After training: lineage, the best checkpoint's evaluation (plots, prediction grid; ``evaluate``) and the
    MLflow model.

    Returns the logged model's URI (``runs:/…`` / ``models:/m-…``), which the register stage registers.
    """
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    client = mlflow.MlflowClient(uri)
    root = project_root()
    # lineage: the tree it was trained from (the stage's own workspace: a --temp/--queue copy holds the
    # experiment's tree), and its data
    for key, value in lineage.git_state(Path.cwd()).items():
        client.set_tag(run_id, key, value)
    split = cfg.data.datamodule.val_split
    with using_store(uri):
        lineage.log_datasets(run_id, cfg.data, root, {"training": cfg.data.datamodule.train_split,
                                                      "validation": split})
    client.set_tag(run_id, "mlflow.note.content",  # the run's description in the UI (registration adds the card)
                   f"{cfg.model.name} trained on {cfg.data.name} `{cfg.data.datamodule.train_split}`, validated on "
                   f"`{split}`; curves under Model metrics, evaluation plots under Artifacts/evaluation.")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if evaluate:
        report = evaluate_checkpoint(best_checkpoint, cfg.data.root, split, num_overlays=cfg.tracking.num_overlays,
                                     data=data)
        log_evaluation(client, run_id, report)
        examples = report.example_images[:2]
    else:  # the DVC pipeline's evaluate stage evaluates the checkpoint and logs its reports here, once
        dataset = open_split(data, split)
        examples = [dataset[index][0] for index in range(min(2, len(dataset)))]
    if not cfg.tracking.log_model:  # no MLflow model to carry the weights: the checkpoint is the run's copy
        client.log_artifact(run_id, str(best_checkpoint), "checkpoints")
        return ""
    # the model carries the weights (only): the checkpoint is not logged too
    with using_store(uri), mlflow.start_run(run_id=run_id):
        return log_pyfunc_model(best_checkpoint, examples)


def log_imported_model(checkpoint: Path, registered_name: str, source: str, variant: str,
                       val_mean_iou: float | None = None, tracking_uri: str | None = None) -> int:
    """Logs an imported checkpoint (``fcnseg import-weights``) as an MLflow model in its own run and registers
    it (alias ``challenger``). Returns the new version number."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # an import may be a new store's first run
    example = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))  # any RGB image will do
    imported_in = experiment_id(client, "fcnseg-imported")
    with using_store(uri), mlflow.start_run(experiment_id=imported_in, run_name=f"import-{variant}") as run:
        mlflow.set_tags({"model": variant, "source_weights": str(source), "imported": "true",
                         **lineage.git_state(project_root())})
        model_uri = log_pyfunc_model(checkpoint, [example])  # the model carries the weights, logged once
    version = registry.register_model(model_uri, registered_name, val_mean_iou=val_mean_iou, data_version=None,
                                      client=client, tags={"model": variant, "source_weights": str(source),
                                                           "run_id": run.info.run_id})
    return int(version.version)
