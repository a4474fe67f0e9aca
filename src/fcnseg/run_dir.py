"""A training run: its directory (a fixed layout of relative paths), the rules for resuming it, its MLflow run's
lifecycle (open, reopen for the evaluate stage, replay for ``fcnseg sync-run``) and what happens after training.

The one module that spells a run dir's file names. Nothing written into a run dir holds an absolute path: the
result file names files relative to the run dir, the run record names a local SQLite store relative to the project
root, and checkpoints store their callbacks' paths relative (:class:`fcnseg.checkpointing.RelocatableCheckpoints`),
so a run dir moved, or pulled by a teammate into another checkout, resumes, evaluates and registers there.

Layout::

    config.yaml           the resolved config the run was started with (resume check, sync-run)
    metrics.csv           Lightning's CSV log (DVC plots, sync-run)
    checkpoints/best.ckpt checkpoints/last.ckpt
    mlflow_run.json       the MLflow run it logs into: {"run_id", "tracking_uri" | "store"}
    train_result.json     best checkpoint (relative), score, run id, logged model URI
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fcnseg.errors import CheckpointError, ConfigError, TrackingError
from fcnseg.runs import flatten, project_root, read_metrics_csv

CONFIG, METRICS_CSV, RECORD, RESULT = "config.yaml", "metrics.csv", "mlflow_run.json", "train_result.json"
CHECKPOINTS, BEST, LAST = "checkpoints", "best", "last"  # checkpoint file stems (Lightning adds .ckpt)
SQLITE = "sqlite:///"


@dataclass(frozen=True)
class RunDir:
    """The files of one training run, under ``path`` (relative or absolute, as the caller gives it)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    config = property(lambda self: self.path / CONFIG)
    metrics_csv = property(lambda self: self.path / METRICS_CSV)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    best = property(lambda self: self.path / CHECKPOINTS / f"{BEST}.ckpt")
    last = property(lambda self: self.path / CHECKPOINTS / f"{LAST}.ckpt")
    record_file = property(lambda self: self.path / RECORD)
    result_file = property(lambda self: self.path / RESULT)

    # --- the run record: which MLflow run this dir logs into -------------------------------------------------
    def read_record(self) -> dict[str, Any]:
        """``{"run_id", "tracking_uri", ...}`` with a relative store resolved against this project; {} if none."""
        if not self.record_file.is_file():
            return {}
        record = json.loads(self.record_file.read_text())
        if "store" in record:  # a SQLite file in the project, written relative to its root
            record["tracking_uri"] = f"{SQLITE}{project_root() / record.pop('store')}"
        return record

    def write_record(self, run_id: str, tracking_uri: str, **extra: Any) -> None:
        record: dict[str, Any] = {"run_id": run_id, **extra}
        local = _project_relative_sqlite(tracking_uri)
        record.update({"store": local} if local else {"tracking_uri": tracking_uri})
        _atomic_write(self.record_file, json.dumps(record, indent=2))

    # --- the result: what training made ------------------------------------------------------------------------
    def read_result(self) -> dict[str, Any]:
        """The result file, its paths resolved against this run dir."""
        result = json.loads(self.result_file.read_text())
        if result.get("best_checkpoint"):
            result["best_checkpoint"] = str(self.path / result["best_checkpoint"])
        return result

    def write_result(self, result: dict[str, Any]) -> None:
        written = dict(result)
        if written.get("best_checkpoint"):
            written["best_checkpoint"] = os.path.relpath(written["best_checkpoint"], self.path)
        written.pop("output_dir", None)  # the run dir is where the file is
        _atomic_write(self.result_file, json.dumps(written, indent=2))

    def write_config(self, cfg: DictConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.config, OmegaConf.to_yaml(cfg, resolve=True))

    def recorded_config(self) -> dict[str, Any] | None:
        return OmegaConf.to_container(OmegaConf.load(self.config), resolve=False) if self.config.is_file() else None


def _project_relative_sqlite(uri: str) -> str | None:
    """The path of a SQLite store inside the project, relative to its root; None for any other store."""
    if not uri.startswith(SQLITE):
        return None
    path, root = Path(uri[len(SQLITE):]), project_root()
    if not path.is_absolute():
        return None
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(text)
    os.replace(temp, path)


# --- resume rules ----------------------------------------------------------------------------------------------

# Keys that cannot change what a resumed run trains (where it runs, how fast, what it logs, when it stops by the clock).
# Everything else must match the checkpoint's config, or the run refuses to resume (see `check_resume_config`).
RESUME_EXEMPT_KEYS = (
    "ckpt_path", "resume", "paths", "tracking", "logger", "callbacks.lr_monitor",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.enable_progress_bar",
    "trainer.log_every_n_steps", "trainer.max_time",
    "data.datamodule.num_workers", "data.datamodule.pin_memory", "data.datamodule.val_batch_size",
    "data.mirrors", "data.tarball", "data.sbd_tarball",  # where the archive comes from: its MD5 is checked
    "training.train_metrics_every_n_steps", "training.nonfinite_check_every_n_steps", "training.compile",
    "training.channels_last",
)


def _exempt(key: str) -> bool:
    return any(key == e or key.startswith(e + ".") for e in RESUME_EXEMPT_KEYS)


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, exempt keys left out."""
    old_flat, new_flat = flatten(old), flatten(new)
    keys = sorted(set(old_flat) | set(new_flat))
    return [key for key in keys if not _exempt(key) and old_flat.get(key) != new_flat.get(key)]


def resume_key(config: dict[str, Any]) -> str:
    """A digest of what a run trains (the config without exempt keys): equal exactly when a checkpoint of one
    config may be resumed by the other."""
    kept = {key: value for key, value in flatten(config).items() if not _exempt(key)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_resume_checkpoint(ckpt_path: str | None, run: RunDir) -> str | None:
    """``last``: resume from the run dir's last checkpoint if a previous (interrupted) run left one."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        return str(run.last) if run.last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path} does not exist; pass an existing .ckpt, 'last' or null")
    return ckpt_path


def check_resume_config(cfg: DictConfig, run: RunDir | Path, checkpoint: str) -> list[str]:
    """Refuses (ConfigError) to resume ``checkpoint`` when the run dir's run was started with another config.

    Returns the differing keys when ``resume=force`` resumes anyway; an empty list when the configs agree.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    old = run.recorded_config()
    if old is None:  # a run from before configs were recorded: nothing to compare with
        return []
    differing = config_differences(old, OmegaConf.to_container(cfg, resolve=True))
    if differing and cfg.get("resume", "strict") != "force":
        shown = ", ".join(differing[:8]) + (f" (+{len(differing) - 8} more)" if len(differing) > 8 else "")
        raise ConfigError(
            f"{run.path} holds a run with another config (differs in: {shown}), so its {Path(checkpoint).name} "
            f"would not continue this one; use a new paths.output_dir, or start over here with ckpt_path=null, "
            f"or resume anyway with resume=force"
        )
    return differing


def csv_rows_before(run: RunDir, checkpoint: str | None) -> list[dict[str, str]]:
    """Rows of a resumed run's metrics.csv up to its checkpoint's step (Lightning's CSVLogger deletes the file)."""
    rows = read_metrics_csv(run.metrics_csv) if checkpoint else []
    if not rows:
        return []
    import torch

    # mmap: only the step is read here, not the weights (Lightning loads the checkpoint itself right after)
    step = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0)
    return [row for row in rows if row.get("step") and int(float(row["step"])) <= step]


def prepend_csv_rows(run: RunDir, rows: list[dict[str, str]]) -> None:
    new_rows = read_metrics_csv(run.metrics_csv)  # none when the resumed run had nothing left to train
    fields = sorted({key for row in rows + new_rows for key in row})
    with run.metrics_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows + new_rows)


# --- a DVC stage's run: resume across `dvc exp run`, start over without losing the old run --------------------

STASH_DIR = Path(".dvc/tmp/fcnseg-runs")  # under the main project's root; git and DVC leave .dvc/tmp alone


def stash_for(config: dict[str, Any]) -> RunDir:
    """Where a DVC stage keeps a copy of its resumable state, keyed by what it trains.

    DVC's experiment executor restores HEAD's outputs before it runs a stage (``dvc exp run``, ``--temp``,
    ``--queue``), which replaces an interrupted ``artifacts/train``. This copy, outside every workspace DVC
    restores, is what the rerun resumes from."""
    return RunDir(project_root() / STASH_DIR / resume_key(config))


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)  # checkpoints are replaced by rename, never rewritten: a link is a safe copy
    except OSError:
        shutil.copy2(source, temp)
    os.replace(temp, target)
    temp.unlink(missing_ok=True)  # rename() between two links of one file (copied before) does nothing, leaves temp


def copy_resumable(source: RunDir, target: RunDir) -> bool:
    """Copies what resuming needs (last and best checkpoints, config, CSV log, run record); False when there is no
    last checkpoint. The best one too: a resumed run whose epochs do not improve on it writes no new one."""
    if not source.last.is_file():
        return False
    for name in (CONFIG, METRICS_CSV, RECORD):
        if (source.path / name).is_file():
            _link_or_copy(source.path / name, target.path / name)
    if source.best.is_file():
        _link_or_copy(source.best, target.best)
    _link_or_copy(source.last, target.last)
    return True


def set_aside(run: RunDir) -> RunDir | None:
    """Renames a run dir out of the way (kept until the run replacing it has written its first checkpoint)."""
    if not run.path.exists():
        return None
    # beside the stashes, outside the workspace: neither git nor a DVC experiment's commit picks it up
    aside = RunDir(project_root() / STASH_DIR / "previous" / run.path.name)
    aside.path.parent.mkdir(parents=True, exist_ok=True)
    if aside.path.exists():
        shutil.rmtree(aside.path)
    os.replace(run.path, aside.path)
    return aside


def start_stage_run(run: RunDir, stash: RunDir, config: dict[str, Any]) -> RunDir | None:
    """Before a DVC stage trains into ``run``: resume in place (the same config, ``dvc repro``), or from the stash
    (an interrupted ``dvc exp run``), or start over with the old run set aside. Returns the set-aside run, if any."""
    recorded = run.recorded_config()
    unfinished = run.last.is_file() and not run.result_file.is_file()  # a finished run is trained again, not resumed
    if recorded is not None and not config_differences(recorded, config) and unfinished:
        print(f"resuming the interrupted run of this config from its last checkpoint (in {run.path})", flush=True)
        return None
    stashed = stash.recorded_config()
    if stash.last.is_file() and (stashed is None or not config_differences(stashed, config)):
        aside = set_aside(run)
        copy_resumable(stash, run)
        print(f"resuming the interrupted run of this config from its last checkpoint (kept in {stash.path})",
              flush=True)
        return aside
    if not run.path.exists():
        return None
    differing = config_differences(recorded, config) if recorded is not None else ["(no recorded config)"]
    held = (f"a run of another config (differs in: {', '.join(differing[:8])})" if differing else
            "a finished run of this config (its code or data changed, or --force)")
    aside = set_aside(run)
    print(f"{run.path} holds {held}; starting over (the old run waits in {aside.path} until the new one has "
          f"written its first checkpoint)", flush=True)
    return aside


def restore_aside(run: RunDir, aside: RunDir | None) -> None:
    """A new run that failed before its first checkpoint gives the set-aside run its place back."""
    if aside is None or not aside.path.exists() or run.last.is_file():
        return
    if run.path.exists():
        shutil.rmtree(run.path)
    os.replace(aside.path, run.path)


def drop(run: RunDir | None) -> None:
    if run is not None and run.path.exists():
        shutil.rmtree(run.path, ignore_errors=True)
        with contextlib.suppress(OSError):  # the stash area's "previous/" when it held only this run
            run.path.parent.rmdir()


def keeper_callback(stash: RunDir, run: RunDir, aside: RunDir | None):
    """A Lightning callback that copies the run's resumable state into ``stash`` at each epoch's start and when
    training stops on an exception (Ctrl-C included), and removes the set-aside old run once the new run has a
    checkpoint. Hooks run before the epoch's own checkpoint, so a SIGKILL loses at most the epoch in flight."""
    from lightning.pytorch.callbacks import Callback

    class KeepResumable(Callback):
        def _keep(self, trainer) -> None:
            if not trainer.is_global_zero or not run.last.is_file():
                return
            for logger in trainer.loggers:  # metrics.csv up to the checkpoint (the CSV logger buffers rows)
                logger.save()
            copy_resumable(run, stash)
            if aside is not None and aside.path.exists():
                shutil.rmtree(aside.path, ignore_errors=True)

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._keep(trainer)

        def on_exception(self, trainer, pl_module, exception) -> None:
            self._keep(trainer)

    return KeepResumable()


# --- the MLflow run --------------------------------------------------------------------------------------------

def reopen(run: RunDir, tracking_uri: str | None = None):
    """The MLflow client and run id a run dir logs into (the evaluate stage, sync-run), or None without a record.

    A pulled run dir whose run is not in this store (a teammate's local SQLite file) fails in one line."""
    import mlflow
    from mlflow.exceptions import MlflowException

    record = run.read_record()
    if not record:
        return None
    uri = tracking_uri or record["tracking_uri"]
    client = mlflow.MlflowClient(uri)
    try:
        client.get_run(record["run_id"])
    except MlflowException as exc:
        raise TrackingError(
            f"{run.path} logs into MLflow run {record['run_id']}, which {uri} does not hold (a run trained against "
            f"another store, e.g. a teammate's local mlflow.db); point MLFLOW_TRACKING_URI at the team's server, or "
            f"train again here") from exc
    return client, record["run_id"]


def create_logger(cfg: DictConfig, run: RunDir, resuming: bool):
    """Training's MLflow logger (:func:`fcnseg.tracking.create_logger`): a resumed run continues the MLflow run its
    record names when it is in the same store; otherwise a new run."""
    from fcnseg import tracking
    from fcnseg.runs import resolve_tracking_uri

    record = run.read_record() if resuming else {}
    same_store = record.get("tracking_uri") == resolve_tracking_uri(cfg.tracking.tracking_uri)
    return tracking.create_logger(cfg, run.path, run_id=record.get("run_id") if same_store else None)


def open_run(logger, cfg: DictConfig, run: RunDir, resumed: bool, changed_keys: list[str]) -> None:
    """Global rank 0, before training: opens (or continues) the MLflow run, then records it in the run dir."""
    from fcnseg import tracking

    tracking.open_run(logger, cfg, resumed=resumed, changed_keys=changed_keys)
    run.write_record(logger.run_id, logger._tracking_uri, experiment_id=logger.experiment_id)


def finish(cfg: DictConfig, run: RunDir, best: Path, score: float | None, logger, *,
           earlier_rows: list[dict[str, str]], evaluate: bool = True) -> dict[str, Any]:
    """The sequence after training (global rank 0, no collective call), the same for ``python -m fcnseg.train``
    and the DVC train stage: the CSV log made whole again, lineage, the evaluation (``evaluate``; the DVC pipeline's
    evaluate stage does it instead, see :func:`evaluate_into_run`), the MLflow model, the result file."""
    from fcnseg.publish import log_training_outputs

    if earlier_rows:
        prepend_csv_rows(run, earlier_rows)
    result: dict[str, Any] = {"best_checkpoint": str(best), "best_score": None if score is None else float(score),
                              "run_id": logger.run_id if logger else None}
    if logger is not None and logger.offline_since is None:
        from fcnseg.runs import ui_links

        result["model_uri"] = log_training_outputs(cfg, logger.run_id, best, evaluate=evaluate)
        for line in ui_links(logger._tracking_uri, experiment_id=logger.experiment_id, run_id=logger.run_id):
            print(f"MLflow {line}", flush=True)
    elif logger is not None:
        import logging

        result["tracking_failed"] = logger.offline_since
        logging.getLogger(__name__).warning(
            "MLflow was unreachable; the run is complete on disk in %s. Log it with: fcnseg sync-run %s",
            run.path, run.path)
    run.write_result(result)
    return {**result, "output_dir": str(run.path)}


def evaluate_into_run(run: RunDir, report, prefix: str, artifact_dir: str, extra_files: tuple[Path, ...] = ()):
    """The DVC evaluate stage's reports, logged into the run the train stage made (reopened from its record)."""
    from fcnseg.publish import log_evaluation

    reopened = reopen(run)
    if reopened is None:
        return
    client, run_id = reopened
    log_evaluation(client, run_id, report, prefix=prefix, artifact_dir=artifact_dir)
    for path in extra_files:
        client.log_artifact(run_id, str(path), artifact_dir)


def sync_run(output_dir: str | Path, tracking_uri: str | None = None) -> str:
    """``fcnseg sync-run``: logs a training run made while MLflow was unreachable (its config, per-epoch metrics from
    the CSV log, evaluation and model) into the run its record names, or a new one. Returns the run id."""
    import mlflow
    from mlflow.entities import Metric

    from fcnseg import lineage
    from fcnseg.publish import log_training_outputs
    from fcnseg.runs import check_reachable, config_params, experiment_id, resolve_tracking_uri

    run = RunDir(Path(output_dir))
    if not run.config.is_file() or not run.metrics_csv.is_file():
        raise TrackingError(f"{run.path} is not a training output dir ({CONFIG} and {METRICS_CSV} expected)")
    cfg = OmegaConf.load(run.config)
    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri)
    check_reachable(uri)
    client = mlflow.MlflowClient(uri)
    recorded = run.read_record()
    run_id = recorded.get("run_id") if recorded.get("tracking_uri") == uri else None
    if run_id is None:
        run_id = client.create_run(experiment_id(client, cfg.tracking.experiment_name),
                                   run_name=cfg.tracking.run_name or cfg.model.name,
                                   tags={"model": cfg.model.name, "dataset": cfg.data.name,
                                         "data_version": lineage.data_version(cfg.data.root)}).info.run_id
        for key, value in config_params(cfg).items():
            client.log_param(run_id, key, value)
        client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), CONFIG)
    metrics = [Metric(key, float(value), 0, int(float(row.get("step") or 0)))
               for row in read_metrics_csv(run.metrics_csv) for key, value in row.items()
               if key not in ("step", "epoch") and value not in (None, "")]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    if run.best.is_file():
        cfg.tracking.tracking_uri = uri
        log_training_outputs(cfg, run_id, run.best)
    client.set_terminated(run_id)
    run.write_record(run_id, uri)
    return run_id
