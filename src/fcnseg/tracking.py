"""Training's MLflow logger: one run per training (opened by global rank 0), the resolved config as its params, and
logging that survives the tracking server going away mid-run (``fcnseg sync-run`` logs the rest later).

Imports Lightning: only training needs it (what happens after training is :mod:`fcnseg.publish`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from fcnseg.errors import TrackingError, one_line
from fcnseg.lineage import EXP_BASELINE, EXP_NAME, GIT_COMMIT, data_version, git_state
from fcnseg.runs import (
    auth_problem, config_params, is_unreachable_error, limit_http_retries, resolve_tracking_uri,
    store_setup_lock,
)


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
            self.offline_since = f"{type(exc).__name__}: {one_line(exc)}"
            rank_zero_warn(
                f"MLflow tracking at {self._tracking_uri} failed ({self.offline_since[:200]}); training goes on, "
                f"metrics and checkpoints go to {self.output_dir}; log the run afterwards with: "
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


def create_logger(cfg: DictConfig, output_dir: Path, run_id: str | None = None) -> ResilientMLFlowLogger | None:
    """An MLFlowLogger for this run, or None when tracking is off. It starts no MLflow run by itself: global rank 0
    opens it (:func:`open_run`) once the Trainer knows the ranks, so a distributed job makes exactly one run.

    Continues ``run_id`` (a resumed training run: :func:`fcnseg.run_dir.create_logger` reads it from the run dir),
    or the one ``mlflow run`` started (``MLFLOW_RUN_ID``); otherwise a new run in ``tracking.experiment_name``.
    """
    # Other ranks log nothing to MLflow; they make no client either (torchrun starts all ranks at once, and two
    # processes creating a new SQLite store's tables at once collide). The rank here comes from the launcher's env.
    if not cfg.tracking.enabled or rank_zero_only.rank != 0:
        return None
    limit_http_retries()
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    run_id = os.environ.get("MLFLOW_RUN_ID") or run_id
    tags = {
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "data_version": data_version(cfg.data.root),
    }
    # the stage's own workspace: a --temp/--queue experiment's copy holds the experiment's tree, not the project's
    source = git_state(Path.cwd())
    if source.get(GIT_COMMIT):
        tags["mlflow.source.git.commit"] = source[GIT_COMMIT]
    tags.update({key: source[key] for key in (EXP_NAME, EXP_BASELINE) if key in source})
    with store_setup_lock(uri):  # MLflow's client creates (migrates) a new SQLite store's tables right away
        return ResilientMLFlowLogger(
            output_dir=output_dir,
            experiment_name=cfg.tracking.experiment_name,
            run_name=cfg.tracking.run_name or cfg.model.name,
            tracking_uri=uri,
            tags=tags,
            run_id=run_id,
        )


def open_run(logger, cfg: DictConfig, resumed: bool = False, changed_keys: list[str] | None = None) -> None:
    """Global rank 0 only: creates (or continues) the MLflow run now, so a broken store fails before training,
    and logs the config (:func:`fcnseg.run_dir.open_run` records it in the run dir). A resumed run's params were logged when it started (MLflow
    refuses to change them): it logs only what ``resume=force`` changed, as a tag."""
    uri = logger._tracking_uri  # an HTTP server's reachability was checked when training started (fcnseg.train)
    try:
        with store_setup_lock(uri):  # jobs of a sweep start at once: one creates the store and the experiment
            logger.experiment
    except Exception as exc:
        raise TrackingError(auth_problem(exc, "start an MLflow run", uri)
                            or f"cannot use MLflow tracking store {uri}: {one_line(exc)}") from exc
    if not resumed or not _has_params(logger):
        log_config(logger, cfg)
    if changed_keys:
        logger.experiment.set_tag(logger.run_id, "resumed_with_config_changes", ", ".join(changed_keys)[:5000])


def _has_params(logger) -> bool:
    return bool(logger.experiment.get_run(logger.run_id).data.params)


def log_config(logger, cfg: DictConfig) -> None:
    """The full resolved config: flattened as params (for the compare view) and as a YAML artifact."""
    logger.log_hyperparams(config_params(cfg))
    logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
