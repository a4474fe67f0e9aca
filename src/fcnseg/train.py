"""Training entry point: ``python -m fcnseg.train [overrides]`` (Hydra) or ``fcnseg-train``.

Composes ``conf/``, builds the datamodule, the FCN and the LightningModule, trains with checkpoints of the best
``val/mean_iou``, and records the run in MLflow (config, metrics, plots, checkpoint, model).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from fcnseg import tracking
from fcnseg.checkpointing import AtomicCheckpointIO, RngStateCheckpoint
from fcnseg.cli_errors import exit_on_user_error, precheck_overrides
from fcnseg.config import CONFIG_DIR, CONFIG_NAME
from fcnseg.data.classes import VOC_CLASSES
from fcnseg.data.prepare import prepare
from fcnseg.errors import CheckpointError, ConfigError
from fcnseg.models import init_from_coarser
from fcnseg.module import SegmentationModule
from fcnseg.publish import log_training_outputs
from fcnseg.runs import read_metrics_csv

log = logging.getLogger(__name__)
DEFAULT_OUTPUT_DIR = Path("artifacts/train")


def resolve_output_dir(cfg: DictConfig) -> Path:
    if cfg.paths.output_dir:
        return Path(cfg.paths.output_dir)
    if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run`: one dir per MLflow run (`--run-id` of a run resumes it)
        return Path("artifacts/mlflow-run") / os.environ["MLFLOW_RUN_ID"]
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
    rows = read_metrics_csv(metrics_csv) if checkpoint else []
    if not rows:
        return []
    # mmap: only the step is read here, not the weights (Lightning loads the checkpoint itself right after)
    step = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0)
    return [row for row in rows if row.get("step") and int(float(row["step"])) <= step]


def prepend_csv_rows(metrics_csv: Path, rows: list[dict[str, str]]) -> None:
    new_rows = read_metrics_csv(metrics_csv)  # none when the resumed run had nothing left to train
    fields = sorted({key for row in rows + new_rows for key in row})
    with metrics_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows + new_rows)


# Keys that cannot change what a resumed run trains (where it runs, how fast, what it logs, when it stops by the clock).
# Everything else must match the checkpoint's config, or the run refuses to resume (see `check_resume_config`).
RESUME_EXEMPT_KEYS = (
    "ckpt_path", "resume", "paths", "tracking",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.enable_progress_bar",
    "trainer.log_every_n_steps", "trainer.max_time",
    "data.datamodule.num_workers", "data.datamodule.pin_memory", "data.datamodule.val_batch_size",
    "data.mirrors", "data.tarball", "data.sbd_tarball",  # where the archive comes from: its MD5 is checked
    "training.train_metrics_every_n_steps", "training.nonfinite_check_every_n_steps", "training.compile",
    "training.channels_last",
)
RUN_CONFIG = "config.yaml"  # the config the run in an output dir was started with (resume check, `fcnseg sync-run`)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, exempt keys left out."""
    old_flat, new_flat = _flat(old), _flat(new)
    keys = sorted(set(old_flat) | set(new_flat))
    exempt = lambda key: any(key == e or key.startswith(e + ".") for e in RESUME_EXEMPT_KEYS)  # noqa: E731
    return [key for key in keys if not exempt(key) and old_flat.get(key) != new_flat.get(key)]


def check_resume_config(cfg: DictConfig, output_dir: Path, checkpoint: str) -> list[str]:
    """Refuses (ConfigError) to resume ``checkpoint`` when the output dir's run was started with another config.

    Returns the differing keys when ``resume=force`` resumes anyway; an empty list when the configs agree.
    """
    recorded = output_dir / RUN_CONFIG
    if not recorded.is_file():  # a run from before configs were recorded: nothing to compare with
        return []
    old = OmegaConf.to_container(OmegaConf.load(recorded), resolve=False)
    differing = config_differences(old, OmegaConf.to_container(cfg, resolve=True))
    if differing and cfg.get("resume", "strict") != "force":
        shown = ", ".join(differing[:8]) + (f" (+{len(differing) - 8} more)" if len(differing) > 8 else "")
        raise ConfigError(
            f"{output_dir} holds a run with another config (differs in: {shown}), so its {Path(checkpoint).name} "
            f"would not continue this one; use a new paths.output_dir, or start over here with ckpt_path=null, "
            f"or resume anyway with resume=force"
        )
    return differing


def build_module(cfg: DictConfig) -> SegmentationModule:
    module = SegmentationModule(
        net=OmegaConf.to_container(cfg.model.net, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        num_classes=cfg.data.num_classes,
        normalization=cfg.model.normalization,
        class_names=list(VOC_CLASSES[: cfg.data.num_classes]),
        **OmegaConf.to_container(cfg.training, resolve=True),
    )
    if cfg.model.init_from:  # staged training: FCN-16s from FCN-32s, FCN-8s from FCN-16s
        copied = init_from_coarser(module.net, cfg.model.init_from)
        log.info("initialised %d tensors from %s", len(copied), cfg.model.init_from)
    return module


def prepare_generated_data(cfg: DictConfig) -> None:
    """Synthetic data is generated offline in seconds, so training never waits on a manual step. Under DDP every
    rank gets here: the lock makes one process per node write it while the others wait, then find it complete."""
    if cfg.data.source != "synthetic":
        return
    root = Path(cfg.data.root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}.lock"):
        prepare(OmegaConf.to_container(cfg.data, resolve=True), cfg.paths.data_dir)


def train(cfg: DictConfig, output_dir: Path | None = None) -> dict[str, Any]:
    """Trains one model; returns the best checkpoint, its score and the MLflow run id.

    Under DDP every rank runs this function; only global rank 0 writes the run's files (config, results) and talks
    to MLflow, and what it does alone after training makes no collective call.
    """
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(output_dir or resolve_output_dir(cfg))
    checkpoint_dir = output_dir / "checkpoints"
    resume_from = resolve_resume_checkpoint(cfg.ckpt_path, checkpoint_dir)
    changed_keys = check_resume_config(cfg, output_dir, resume_from) if resume_from else []
    prepare_generated_data(cfg)
    datamodule = instantiate(cfg.data.datamodule)
    module = build_module(cfg)
    logger = tracking.create_logger(cfg, output_dir, continue_recorded_run=resume_from is not None)
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor=cfg.checkpoint.monitor, mode=cfg.checkpoint.mode,
        save_top_k=1, enable_version_counter=False,
    )
    # The same callbacks on every rank (their state is checkpointed); the CSV logger feeds LearningRateMonitor.
    callbacks = [checkpoint, RngStateCheckpoint(), LearningRateMonitor("epoch")]
    if cfg.checkpoint.save_last:
        # Lightning 2.6's save_last only writes when a top-k checkpoint was written in the same step, so an
        # epoch that does not improve would leave last.ckpt behind: a monitor-less callback writes it every epoch.
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                                         enable_version_counter=False))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(trainer_cfg["precision"])
    earlier_rows = csv_rows_before(output_dir / "metrics.csv", resume_from)
    # metrics.csv in the output dir feeds `dvc plots`; MLflow is the run's record for people.
    loggers = [CSVLogger(save_dir=str(output_dir), name="", version="")] + ([logger] if logger else [])
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers,
                                     default_root_dir=str(output_dir), plugins=[AtomicCheckpointIO()])
    if trainer.is_global_zero:  # the Trainer knows the global rank (torchrun, SLURM or Lightning's own launcher)
        output_dir.mkdir(parents=True, exist_ok=True)
        if not resume_from or changed_keys:  # the config the checkpoints were trained with
            (output_dir / RUN_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if logger is not None:
            tracking.open_run(logger, cfg, output_dir, resumed=resume_from is not None, changed_keys=changed_keys)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    best = checkpoint.best_model_path or str(checkpoint_dir / "best.ckpt")
    score = checkpoint.best_model_score
    result = {"best_checkpoint": best, "best_score": None if score is None else float(score),
              "run_id": logger.run_id if logger and trainer.is_global_zero else None, "output_dir": str(output_dir)}
    if not trainer.is_global_zero:
        return result
    if earlier_rows:
        prepend_csv_rows(output_dir / "metrics.csv", earlier_rows)
    if logger is not None and logger.offline_since is None:
        result["model_uri"] = log_training_outputs(cfg, logger.run_id, Path(best))
    elif logger is not None:
        result["tracking_failed"] = logger.offline_since
        log.warning("MLflow was unreachable; the run is complete on disk in %s. Log it with: "
                    "fcnseg sync-run %s", output_dir, output_dir)
    (output_dir / "train_result.json").write_text(json.dumps(result, indent=2))
    return result


def is_distributed(trainer_cfg: DictConfig) -> bool:
    strategy = trainer_cfg.get("strategy")
    name = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    return "ddp" in name.lower() or "DDPStrategy" in name


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=CONFIG_NAME)
def hydra_main(cfg: DictConfig) -> float | None:
    with exit_on_user_error():
        if HydraConfig.get().mode == RunMode.MULTIRUN and is_distributed(cfg.trainer):
            # Lightning's DDP launcher re-runs the command line once per rank, and a sweep's command line is the
            # whole sweep: each rank would start every job. One distributed run per command, then.
            raise ConfigError(
                "Hydra multirun (-m) cannot run distributed jobs (trainer=ddp); sweep with one command per job, e.g. "
                "`for m in fcn32s fcn8s; do python -m fcnseg.train trainer=ddp model=$m; done`, or queue them with "
                "`dvc exp run --queue -S trainer=ddp -S model=...`"
            )
        return train(cfg)["best_score"]  # returned for Hydra sweepers


def launcher_run_dir(env: dict[str, str] | None = None) -> str | None:
    """One Hydra run dir for all ranks an external launcher started (torchrun, SLURM): each rank runs this entry
    point, and Hydra's time-stamped default would give each its own. None when not under such a launcher."""
    env = dict(os.environ if env is None else env)
    if int(env.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in env:
        job = env["TORCHELASTIC_RUN_ID"]
        if job == "none":  # torchrun without --rdzv-id/--standalone: its agent is every local rank's parent
            job = f"{socket.gethostname()}-{os.getppid()}"
        return f"outputs/torchrun-{job}"
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return f"outputs/slurm-{env['SLURM_JOB_ID']}"
    return None


def main() -> None:
    precheck_overrides(CONFIG_DIR, CONFIG_NAME)
    run_dir = launcher_run_dir()
    if run_dir and not any(arg.startswith("hydra.run.dir=") for arg in sys.argv[1:]):
        sys.argv.append(f"hydra.run.dir={run_dir}")
    hydra_main()


if __name__ == "__main__":
    main()
