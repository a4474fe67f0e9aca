"""After training, and for runs made elsewhere: what goes into an MLflow run besides its curves. The evaluation
reports (plots, per-class IoU, prediction grid), the self-contained MLflow model, lineage (git, datasets), imported
weights as models of their own, and the replay of a run logged while the server was down (``fcnseg sync-run``).

Makes no collective call: under DDP, rank 0 runs it alone after the others have finished.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric
from omegaconf import DictConfig, OmegaConf

from fcnseg import lineage, registry
from fcnseg.data import VOCSegmentation
from fcnseg.errors import TrackingError
from fcnseg.evaluate import EvaluationReport, evaluate_checkpoint, write_reports
from fcnseg.metrics import SCALAR_KEYS
from fcnseg.runs import (
    check_reachable, config_params, project_root, read_metrics_csv, read_run_record, resolve_tracking_uri,
    using_store, write_run_record,
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


def log_training_outputs(cfg: DictConfig, run_id: str, best_checkpoint: Path) -> str:
    """After training: the best checkpoint, its evaluation (plots, prediction grid) and the MLflow model.

    Returns the logged model's URI (``runs:/…`` / ``models:/m-…``), which the register stage registers.
    """
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    client = mlflow.MlflowClient(uri)
    root = project_root()
    for key, value in lineage.git_state(root).items():  # lineage: the tree it was trained from, and its data
        client.set_tag(run_id, key, value)
    split = cfg.data.datamodule.val_split
    with using_store(uri):
        lineage.log_datasets(run_id, cfg.data, root, {"training": cfg.data.datamodule.train_split,
                                                      "validation": split})
    client.set_tag(run_id, "mlflow.note.content",  # the run's description in the UI (registration adds the card)
                   f"{cfg.model.name} trained on {cfg.data.name} `{cfg.data.datamodule.train_split}`, validated on "
                   f"`{split}`; curves under Model metrics, evaluation plots under Artifacts/evaluation.")
    if cfg.tracking.get("evaluate_after_training", True):
        report = evaluate_checkpoint(best_checkpoint, cfg.data.root, split, num_overlays=cfg.tracking.num_overlays)
        log_evaluation(client, run_id, report)
        examples = report.example_images[:2]
    else:  # the DVC pipeline's evaluate stage evaluates the checkpoint and logs its reports here, once
        dataset = VOCSegmentation(cfg.data.root, split)
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
    experiment_id = _experiment_id(client, "fcnseg-imported")
    with using_store(uri), mlflow.start_run(experiment_id=experiment_id, run_name=f"import-{variant}") as run:
        mlflow.set_tags({"model": variant, "source_weights": str(source), "imported": "true",
                         **lineage.git_state(project_root())})
        model_uri = log_pyfunc_model(checkpoint, [example])  # the model carries the weights, logged once
    version = registry.register_model(model_uri, registered_name, val_mean_iou=val_mean_iou, data_version=None,
                                      client=client, tags={"model": variant, "source_weights": str(source),
                                                           "run_id": run.info.run_id})
    return int(version.version)


def sync_run(output_dir: str | Path, tracking_uri: str | None = None) -> str:
    """Logs a training run made while MLflow was unreachable: its config, per-epoch metrics (from the CSV log),
    checkpoint, evaluation and model, into the run recorded in ``output_dir`` (or a new one). Returns the run id.
    """
    output_dir = Path(output_dir)
    config_file, metrics_file = output_dir / "config.yaml", output_dir / "metrics.csv"
    if not config_file.is_file() or not metrics_file.is_file():
        raise TrackingError(f"{output_dir} is not a training output dir (config.yaml and metrics.csv expected)")
    cfg = OmegaConf.load(config_file)
    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri)
    check_reachable(uri)
    client = mlflow.MlflowClient(uri)
    recorded = read_run_record(output_dir)
    run_id = recorded.get("run_id") if recorded.get("tracking_uri") == uri else None
    if run_id is None:
        run_id = client.create_run(_experiment_id(client, cfg.tracking.experiment_name),
                                   run_name=cfg.tracking.run_name or cfg.model.name,
                                   tags={"model": cfg.model.name, "dataset": cfg.data.name,
                                         "data_version": lineage.data_version(cfg.data.root)}).info.run_id
        for key, value in config_params(cfg).items():
            client.log_param(run_id, key, value)
        client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    metrics = [Metric(key, float(value), 0, int(float(row.get("step") or 0)))
               for row in read_metrics_csv(metrics_file) for key, value in row.items()
               if key not in ("step", "epoch") and value not in (None, "")]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    best = output_dir / "checkpoints" / "best.ckpt"
    if best.is_file():
        cfg.tracking.tracking_uri = uri
        log_training_outputs(cfg, run_id, best)
    client.set_terminated(run_id)
    write_run_record(output_dir, run_id, uri)
    return run_id


def _experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    """The experiment's id, created if new (without ``mlflow.set_experiment``, which changes process-wide state)."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)
