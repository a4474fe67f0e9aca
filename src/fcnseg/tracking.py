"""MLflow tracking: where runs go, what each run records (config, tags, plots, checkpoint, model)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fcnseg.errors import TrackingError

RUN_FILE = "mlflow_run.json"  # in the training output dir: lets a resumed run continue the same MLflow run


def project_root(start: Path | None = None) -> Path:
    """The project's root: the nearest directory holding dvc.yaml (or .git), outside DVC's temp experiment dirs."""
    here = (start or Path.cwd()).resolve()
    text = str(here)
    if "/.dvc/tmp/exps/" in text:  # `dvc exp run --temp/--queue` runs in a copy: track into the real project
        here = Path(text.split("/.dvc/tmp/exps/")[0])
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".git").exists():
            return candidate
    return here


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An explicit URI, else $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db (a real DB, no server)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fails within seconds, in one line, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, point MLFLOW_TRACKING_URI at a "
            f"running one, or train without tracking: tracking.enabled=false"
        ) from exc


def git_commit(root: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def data_version(data_root: str | Path) -> str:
    """The dataset's version: DVC's hash of the prepared data when dvc.lock has it, else a hash of its marker.

    Models are only compared (promotion) when trained and evaluated on the same data version.
    """
    data_root = Path(data_root)
    lock = project_root() / "dvc.lock"
    if lock.is_file():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                out_path = (project_root() / out["path"]).resolve()
                if out_path == data_root.resolve() or out_path in data_root.resolve().parents:
                    return str(out.get("md5", "unknown"))
    digest = hashlib.md5()
    marker = data_root / ".complete"
    if marker.is_file():
        digest.update(marker.read_bytes())
    else:  # no marker: the split lists still pin which images are used
        for split_file in sorted((data_root / "ImageSets" / "Segmentation").glob("*.txt")):
            digest.update(split_file.name.encode() + split_file.read_bytes())
    return digest.hexdigest()


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _limit_http_retries() -> None:
    """MLflow retries an unreachable server for minutes per call by default; training must not stall on it."""
    # Also bounds how long rank 0 can stall the others of a DDP job (their collective timeout is 45 s).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def is_unreachable_error(exc: BaseException) -> bool:
    """True for an outage (no answer, connection or timeout errors, a server error, a locked database); False when
    MLflow answered and refused the call (e.g. "Changing param values is not allowed": a config conflict)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        if exc.get_http_status_code() >= 500 and "API request" in str(exc):
            return True  # the REST client's "API request to ... failed" after its retries
        return exc.error_code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR") and "Changing param" not in str(exc)
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or type(exc).__name__ in (
        "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "MaxRetryError", "OperationalError")


@functools.cache  # one class, however often it is asked for
def _make_resilient_logger_class():
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_warn

    class ResilientMLFlowLogger(MLFlowLogger):
        """Lightning's MLFlowLogger that keeps training going when the tracking server goes away mid-run.

        After the first failed call it stops calling MLflow and says once how to log the run afterwards
        (``fcnseg sync-run``); metrics keep going to the CSV log and checkpoints to disk.
        """

        def __init__(self, *args: Any, output_dir: Path, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.output_dir = Path(output_dir)
            self.offline_since: str | None = None

        def _guard(self, call, *args: Any) -> None:
            if self.offline_since is not None:
                return
            try:
                call(*args)
            except Exception as exc:
                if not is_unreachable_error(exc):  # MLflow answered and refused: a real error, not an outage
                    raise TrackingError(f"MLflow refused a call to {self._tracking_uri}: "
                                        f"{' '.join(str(exc).split())[:300]}") from exc
                # the store is gone (server down, network, locked file): training matters more than logging
                self.offline_since = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                rank_zero_warn(
                    f"MLflow tracking at {self._tracking_uri} failed ({self.offline_since[:200]}); training goes on, "
                    f"metrics go to {self.output_dir / 'metrics.csv'} and checkpoints to "
                    f"{self.output_dir / 'checkpoints'}; log the run afterwards with: "
                    f"fcnseg sync-run {self.output_dir}"
                )

        def log_metrics(self, metrics, step=None) -> None:
            self._guard(super().log_metrics, metrics, step)

        def log_hyperparams(self, params) -> None:
            self._guard(super().log_hyperparams, params)

        def after_save_checkpoint(self, checkpoint_callback) -> None:
            self._guard(super().after_save_checkpoint, checkpoint_callback)

        def finalize(self, status: str = "success") -> None:
            self._guard(super().finalize, status)

    return ResilientMLFlowLogger


def __getattr__(name: str):  # ResilientMLFlowLogger is built lazily: importing tracking must not import Lightning
    if name == "ResilientMLFlowLogger":
        return _make_resilient_logger_class()
    raise AttributeError(name)


def create_logger(cfg: DictConfig, output_dir: Path, continue_recorded_run: bool = True):
    """An MLFlowLogger for this run, or None when tracking is off. It starts no MLflow run by itself: global rank 0
    opens it (:func:`open_run`) once the Trainer knows the ranks, so a distributed job makes exactly one run.

    Continues the run recorded in ``output_dir`` when ``continue_recorded_run`` (a resumed training run), or the one
    ``mlflow run`` started (``MLFLOW_RUN_ID``); otherwise a new run in ``tracking.experiment_name``.
    """
    from lightning.pytorch.utilities import rank_zero_only

    # Other ranks log nothing to MLflow; they make no client either (torchrun starts all ranks at once, and two
    # processes creating a new SQLite store's tables at once collide). The rank here comes from the launcher's env.
    if not cfg.tracking.enabled or rank_zero_only.rank != 0:
        return None
    ResilientMLFlowLogger = _make_resilient_logger_class()
    _limit_http_retries()
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    run_file = output_dir / RUN_FILE
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id is None and continue_recorded_run and run_file.is_file():
        recorded = json.loads(run_file.read_text())
        if recorded.get("tracking_uri") == uri:
            run_id = recorded["run_id"]
    tags = {
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "data_version": data_version(cfg.data.root),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return ResilientMLFlowLogger(
        output_dir=output_dir,
        experiment_name=cfg.tracking.experiment_name,
        run_name=cfg.tracking.run_name or cfg.model.name,
        tracking_uri=uri,
        tags=tags,
        run_id=run_id,
    )


def open_run(logger, cfg: DictConfig, output_dir: Path, resumed: bool = False,
             changed_keys: list[str] | None = None) -> None:
    """Global rank 0 only: creates (or continues) the MLflow run now, so a broken store fails before training,
    records it in ``output_dir`` and logs the config. A resumed run's params were logged when it started (MLflow
    refuses to change them): it logs only what ``resume=force`` changed, as a tag."""
    check_reachable(logger._tracking_uri)
    try:
        logger.experiment
    except Exception as exc:
        raise TrackingError(f"cannot use MLflow tracking store {logger._tracking_uri}: "
                            f"{str(exc).splitlines()[0]}") from exc
    (output_dir / RUN_FILE).write_text(json.dumps({"run_id": logger.run_id, "tracking_uri": logger._tracking_uri,
                                                   "experiment_id": logger.experiment_id}))
    if not resumed or not _has_params(logger):
        log_config(logger, cfg)
    if changed_keys:
        logger.experiment.set_tag(logger.run_id, "resumed_with_config_changes", ", ".join(changed_keys)[:5000])


def _has_params(logger) -> bool:
    return bool(logger.experiment.get_run(logger.run_id).data.params)


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config flattened into MLflow params (values cut to MLflow's 500-character limit)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return {key: ("" if value is None else str(value)[:500]) for key, value in flatten(container).items()}


def log_config(logger, cfg: DictConfig) -> None:
    """The full resolved config: flattened as params (for the compare view) and as a YAML artifact."""
    logger.log_hyperparams(config_params(cfg))
    logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def log_evaluation(client, run_id: str, results: dict[str, Any], class_names: list[str],
                   grid: np.ndarray | None, prefix: str = "val", artifact_dir: str = "evaluation") -> None:
    """Confusion-matrix and per-class IoU plots, a per-class IoU table and a prediction grid, as run artifacts."""
    from fcnseg import viz

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        viz.figure_to_png(viz.plot_confusion_matrix(results["confusion_matrix"].cpu().numpy(), class_names),
                          tmp_path / "confusion_matrix.png")
        viz.figure_to_png(viz.plot_per_class_iou(results["per_class_iou"].cpu().numpy(), class_names),
                          tmp_path / "per_class_iou.png")
        table = {name: (None if iou != iou else iou)
                 for name, iou in zip(class_names, results["per_class_iou"].tolist())}
        (tmp_path / "per_class_iou.json").write_text(json.dumps(table, indent=2))
        if grid is not None:
            from PIL import Image

            Image.fromarray(grid).save(tmp_path / "predictions.png")
        client.log_artifacts(run_id, tmp, artifact_dir)
    summary = {f"{prefix}_best/{k}": float(results[k]) for k in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou")}
    for key, value in summary.items():
        client.log_metric(run_id, key, value)


def log_training_outputs(cfg: DictConfig, run_id: str, best_checkpoint: Path) -> str:
    """After training: the best checkpoint, its evaluation (plots, prediction grid) and the MLflow model.

    Returns the logged model's URI (``runs:/…`` / ``models:/m-…``), which the register stage registers.
    """
    import mlflow

    from fcnseg import lineage
    from fcnseg.evaluate import evaluate_checkpoint
    from fcnseg.serving import log_pyfunc_model

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    root = project_root()
    for key, value in lineage.git_state(root).items():  # lineage: the tree it was trained from, and its data
        client.set_tag(run_id, key, value)
    split = cfg.data.datamodule.val_split
    lineage.log_datasets(run_id, cfg.data, root, {"training": cfg.data.datamodule.train_split, "validation": split})
    client.set_tag(run_id, "mlflow.note.content",  # the run's description in the UI (registration adds the card)
                   f"{cfg.model.name} trained on {cfg.data.name} `{cfg.data.datamodule.train_split}`, validated on "
                   f"`{split}`; curves under Model metrics, evaluation plots under Artifacts/evaluation.")
    if cfg.tracking.get("evaluate_after_training", True):
        report = evaluate_checkpoint(best_checkpoint, cfg.data.root, split, num_overlays=cfg.tracking.num_overlays)
        log_evaluation(client, run_id, report.results, report.class_names, report.grid)
        examples = report.example_images[:2]
    else:  # the DVC pipeline's evaluate stage evaluates the checkpoint and logs its reports here, once
        from fcnseg.data import VOCSegmentation

        dataset = VOCSegmentation(cfg.data.root, split)
        examples = [dataset[index][0] for index in range(min(2, len(dataset)))]
    if not cfg.tracking.log_model:  # no MLflow model to carry the weights: the checkpoint is the run's copy
        client.log_artifact(run_id, str(best_checkpoint), "checkpoints")
        return ""
    with mlflow.start_run(run_id=run_id):  # the model carries the weights (only): the checkpoint is not logged too
        return log_pyfunc_model(best_checkpoint, examples)


def log_imported_model(checkpoint: Path, registered_name: str, source: str, variant: str,
                       val_mean_iou: float | None = None, tracking_uri: str | None = None) -> int:
    """Logs an imported checkpoint (``fcnseg import-weights``) as an MLflow model in its own run and registers
    it (alias ``challenger``). Returns the new version number."""
    import mlflow

    from fcnseg import registry
    from fcnseg.lineage import git_state
    from fcnseg.serving import log_pyfunc_model

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("fcnseg-imported")
    example = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))  # any RGB image will do
    with mlflow.start_run(run_name=f"import-{variant}") as run:
        mlflow.set_tags({"model": variant, "source_weights": str(source), "imported": "true",
                         **git_state(project_root())})
        model_uri = log_pyfunc_model(checkpoint, [example])  # the model carries the weights, logged once
    client = registry.client_for(uri)
    version = registry.register_model(model_uri, registered_name, val_mean_iou=val_mean_iou, data_version=None,
                                      client=client, tags={"model": variant, "source_weights": str(source),
                                                           "run_id": run.info.run_id})
    return int(version.version)


def sync_run(output_dir: str | Path, tracking_uri: str | None = None) -> str:
    """Logs a training run made while MLflow was unreachable: its config, per-epoch metrics (from the CSV log),
    checkpoint, evaluation and model, into the run recorded in ``output_dir`` (or a new one). Returns the run id.
    """
    import csv

    import mlflow
    from mlflow.entities import Metric

    output_dir = Path(output_dir)
    config_file, metrics_file = output_dir / "config.yaml", output_dir / "metrics.csv"
    if not config_file.is_file() or not metrics_file.is_file():
        raise TrackingError(f"{output_dir} is not a training output dir (config.yaml and metrics.csv expected)")
    cfg = OmegaConf.load(config_file)
    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri)
    check_reachable(uri)
    client = mlflow.MlflowClient(uri)
    recorded = json.loads((output_dir / RUN_FILE).read_text()) if (output_dir / RUN_FILE).is_file() else {}
    run_id = recorded.get("run_id") if recorded.get("tracking_uri") == uri else None
    if run_id is None:
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment(cfg.tracking.experiment_name)
        run_id = client.create_run(experiment.experiment_id, run_name=cfg.tracking.run_name or cfg.model.name,
                                   tags={"model": cfg.model.name, "dataset": cfg.data.name,
                                         "data_version": data_version(cfg.data.root)}).info.run_id
        for key, value in config_params(cfg).items():
            client.log_param(run_id, key, value)
        client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    metrics = []
    with metrics_file.open() as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in (None, ""):
                    metrics.append(Metric(key, float(value), 0, step))
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    best = output_dir / "checkpoints" / "best.ckpt"
    if best.is_file():
        cfg.tracking.tracking_uri = uri
        log_training_outputs(cfg, run_id, best)
    client.set_terminated(run_id)
    (output_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    return run_id
