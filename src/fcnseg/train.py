"""Training entry point: ``python -m fcnseg.train [overrides]`` (Hydra) or ``fcnseg-train``.

Composes ``conf/``, builds the datamodule, the FCN and the LightningModule, trains with checkpoints of the best
``val/mean_iou``, and records the run in MLflow (config, metrics, plots, checkpoint, model).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from fcnseg.checkpointing import AtomicCheckpointIO, RngStateCheckpoint
from fcnseg.cli_errors import exit_on_user_error, precheck_overrides
from fcnseg.data.classes import VOC_CLASSES
from fcnseg.errors import CheckpointError
from fcnseg.module import SegmentationModule

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
DEFAULT_OUTPUT_DIR = Path("artifacts/train")


def resolve_output_dir(cfg: DictConfig) -> Path:
    if cfg.paths.output_dir:
        return Path(cfg.paths.output_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return DEFAULT_OUTPUT_DIR


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def resolve_resume_checkpoint(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """``last``: resume from ``checkpoint_dir/last.ckpt`` if a previous (interrupted) run left one."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        last = checkpoint_dir / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path} does not exist; pass an existing .ckpt, 'last' or null")
    return ckpt_path


def csv_rows_before(metrics_csv: Path, checkpoint: str | None) -> list[dict[str, str]]:
    """Rows of a resumed run's metrics.csv up to its checkpoint's step (Lightning's CSVLogger deletes the file)."""
    if not checkpoint or not metrics_csv.is_file():
        return []
    # mmap: only the step is read here, not the weights (Lightning loads the checkpoint itself right after)
    step = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0)
    with metrics_csv.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("step") and int(float(row["step"])) <= step]


def prepend_csv_rows(metrics_csv: Path, rows: list[dict[str, str]]) -> None:
    new_rows = []
    if metrics_csv.is_file():  # absent when the resumed run had nothing left to train
        with metrics_csv.open(newline="") as handle:
            new_rows = list(csv.DictReader(handle))
    fields = sorted({key for row in rows + new_rows for key in row})
    with metrics_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows + new_rows)


def build_module(cfg: DictConfig) -> SegmentationModule:
    module = SegmentationModule(
        net=OmegaConf.to_container(cfg.model.net, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        num_classes=cfg.data.num_classes,
        normalization=cfg.model.normalization,
        class_names=list(VOC_CLASSES[: cfg.data.num_classes]),
    )
    if cfg.model.init_from:  # staged training: FCN-16s from FCN-32s, FCN-8s from FCN-16s
        from fcnseg.models import init_from_coarser

        copied = init_from_coarser(module.net, cfg.model.init_from)
        log.info("initialised %d tensors from %s", len(copied), cfg.model.init_from)
    return module


def train(cfg: DictConfig, output_dir: Path | None = None) -> dict[str, Any]:
    """Trains one model; returns the best checkpoint, its score and the MLflow run id."""
    from fcnseg import tracking

    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(output_dir or resolve_output_dir(cfg))
    checkpoint_dir = output_dir / "checkpoints"
    if cfg.data.source == "synthetic":  # generated offline in seconds, so training never waits on a manual step
        from fcnseg.data.prepare import prepare

        prepare(OmegaConf.to_container(cfg.data, resolve=True), cfg.paths.data_dir)
    datamodule = instantiate(cfg.data.datamodule)
    module = build_module(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # for `fcnseg sync-run`
    logger = tracking.create_logger(cfg, output_dir)
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor=cfg.checkpoint.monitor, mode=cfg.checkpoint.mode,
        save_top_k=1, enable_version_counter=False,
    )
    callbacks = [checkpoint, RngStateCheckpoint()] + ([LearningRateMonitor("epoch")] if logger else [])
    if cfg.checkpoint.save_last:
        # Lightning 2.6's save_last only writes when a top-k checkpoint was written in the same step, so an
        # epoch that does not improve would leave last.ckpt behind: a monitor-less callback writes it every epoch.
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                                         enable_version_counter=False))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(trainer_cfg["precision"])
    resume_from = resolve_resume_checkpoint(cfg.ckpt_path, checkpoint_dir)
    earlier_rows = csv_rows_before(output_dir / "metrics.csv", resume_from)
    # metrics.csv in the output dir feeds `dvc plots`; MLflow is the run's record for people.
    loggers = [CSVLogger(save_dir=str(output_dir), name="", version="")] + ([logger] if logger else [])
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers,
                                     default_root_dir=str(output_dir), plugins=[AtomicCheckpointIO()])
    if logger is not None and trainer.is_global_zero:
        tracking.log_config(logger, cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    if earlier_rows and trainer.is_global_zero:
        prepend_csv_rows(output_dir / "metrics.csv", earlier_rows)

    best = checkpoint.best_model_path or str(checkpoint_dir / "best.ckpt")
    score = checkpoint.best_model_score
    result = {"best_checkpoint": best, "best_score": None if score is None else float(score),
              "run_id": logger.run_id if logger else None, "output_dir": str(output_dir)}
    if trainer.is_global_zero:
        if logger is not None and logger.offline_since is None:
            result["model_uri"] = tracking.log_training_outputs(cfg, logger.run_id, Path(best))
        elif logger is not None:
            result["tracking_failed"] = logger.offline_since
            log.warning("MLflow was unreachable; the run is complete on disk in %s. Log it with: "
                        "fcnseg sync-run %s", output_dir, output_dir)
        (output_dir / "train_result.json").write_text(json.dumps(result, indent=2))
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    with exit_on_user_error():
        return train(cfg)["best_score"]  # returned for Hydra sweepers


def main() -> None:
    precheck_overrides(CONFIG_DIR, "config")
    hydra_main()


if __name__ == "__main__":
    main()
