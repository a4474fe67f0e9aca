"""Training entry point: ``python -m fcnseg.train [overrides]`` (Hydra) or ``fcnseg-train``.

Composes ``conf/``, builds the datamodule, the FCN and the LightningModule, trains with checkpoints of the best
``val/mean_iou``, and records the run in MLflow (config, metrics, plots, checkpoint, model).
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fcnseg import run_dir
from fcnseg.cli_errors import exit_on_user_error, precheck_overrides
from fcnseg.config import CONFIG_DIR, CONFIG_NAME
from fcnseg.data.dataset_spec import DatasetSpec, dataset_spec
from fcnseg.errors import ConfigError
from fcnseg.process_exit import run_then_exit
from fcnseg.run_dir import RunDir, check_resume_config, csv_rows_before, resolve_resume_checkpoint

# torch, Lightning and the net are imported where training starts, not at the top: `--help`, `--cfg job` and a
# mistyped override answer in about a second instead of after the ~8 s those imports take
if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    from fcnseg.module import SegmentationModule

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
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def net_config(cfg: DictConfig, spec: DatasetSpec) -> dict[str, Any]:
    """``model.net`` with its class count from the dataset (``num_classes: null`` follows ``data.class_names``)."""
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    if net.get("num_classes") is None:
        net["num_classes"] = spec.num_classes
    elif int(net["num_classes"]) != spec.num_classes:
        raise ConfigError(f"model.net.num_classes={net['num_classes']} but dataset {spec.name!r} has "
                          f"{spec.num_classes} classes ({', '.join(spec.class_names[:4])}, ...); leave "
                          f"model.net.num_classes=null so it follows data.class_names")
    if cfg.model.get("finetune_from"):  # every backbone tensor comes from the fine-tuned model: fetch no VGG16
        net["backbone_weights"] = None
    return net


def build_module(cfg: DictConfig) -> SegmentationModule:
    """The LightningModule of ``cfg``: the net sized and named by the dataset's spec (``data``), then
    initialised from a coarser net (``model.init_from``) or fine-tuned from a model of another dataset
    (``model.finetune_from``)."""
    from fcnseg.models import init_from_coarser
    from fcnseg.module import SegmentationModule

    spec = dataset_spec(OmegaConf.to_container(cfg.data, resolve=True))
    if cfg.model.get("init_from") and cfg.model.get("finetune_from"):
        raise ConfigError("model.init_from (staged training, same classes) and model.finetune_from (another "
                          "dataset's model) are exclusive: set one of them to null")
    module = SegmentationModule(
        net=net_config(cfg, spec),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        num_classes=spec.num_classes,
        ignore_index=spec.ignore_index,
        normalization=cfg.model.normalization,
        class_names=list(spec.class_names),
        dataset=spec.to_metadata(),
        **OmegaConf.to_container(cfg.training, resolve=True),
    )
    if cfg.model.init_from:  # staged training: FCN-16s from FCN-32s, FCN-8s from FCN-16s
        copied = init_from_coarser(module.net, cfg.model.init_from)
        log.info("initialised %d tensors from %s", len(copied), cfg.model.init_from)
    elif cfg.model.get("finetune_from"):  # VOC weights (or any model) to this dataset's classes
        from fcnseg.finetune import finetune_from

        copied = finetune_from(module.net, str(cfg.model.finetune_from), cfg.model.normalization,
                               cfg.tracking.get("tracking_uri"))
        log.info("fine-tuning from %s: %d tensors kept, score layers re-initialised", cfg.model.finetune_from,
                 len(copied))
    return module


def build_callbacks(cfg: DictConfig, checkpoint_dir: Path) -> dict[str, Callback]:
    """The ``callbacks`` config group, instantiated by key; a ModelCheckpoint without a dirpath writes to the run's
    ``checkpoint_dir``. ``best_checkpoint`` is required: it is the checkpoint the run reports and registers."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks: dict[str, Callback] = {}
    for key, conf in (cfg.get("callbacks") or {}).items():
        if conf is None:  # `callbacks.lr_monitor=null` drops one, as `~callbacks.lr_monitor` does
            continue
        is_checkpoint = issubclass(hydra.utils.get_class(conf._target_), ModelCheckpoint)
        extra = {"dirpath": str(checkpoint_dir)} if is_checkpoint and conf.get("dirpath") is None else {}
        callbacks[key] = instantiate(conf, **extra)
    if not isinstance(callbacks.get("best_checkpoint"), ModelCheckpoint):
        raise ConfigError("callbacks.best_checkpoint must be a lightning.pytorch.callbacks.ModelCheckpoint: it is the "
                          "checkpoint the run reports, evaluates and registers (see conf/callbacks/default.yaml)")
    return callbacks


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Logger]:
    """The ``logger`` config group (MLflow aside: :mod:`fcnseg.tracking`); ``save_dir`` null = the run's dir."""
    loggers = []
    for conf in (cfg.get("logger") or {}).values():
        if conf is not None:
            loggers.append(instantiate(conf, **({"save_dir": str(output_dir)} if conf.get("save_dir") is None else {})))
    return loggers


def prepare_generated_data(cfg: DictConfig) -> None:
    """Synthetic data is generated offline in seconds, so training never waits on a manual step. Under DDP every
    rank gets here: the lock makes one process per node write it while the others wait, then find it complete."""
    if cfg.data.source != "synthetic":
        return
    from fcnseg.data.prepare import prepare

    root = Path(cfg.data.root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}.lock"):
        prepare(OmegaConf.to_container(cfg.data, resolve=True), cfg.paths.data_dir)


def train(cfg: DictConfig, output_dir: Path | None = None, *, evaluate: bool = True,
          extra_callbacks: list[Callback] = ()) -> dict[str, Any]:
    """Trains one model; returns the best checkpoint, its score and the MLflow run id. The run dir and the MLflow
    run's lifecycle are :mod:`fcnseg.run_dir`'s, and so is what follows training (``evaluate``: the best checkpoint
    is evaluated and logged; the DVC pipeline's evaluate stage does that instead).

    Under DDP every rank runs this function; only global rank 0 writes the run's files (config, results) and talks
    to MLflow, and what it does alone after training makes no collective call.
    """
    output_dir = Path(output_dir or resolve_output_dir(cfg))
    run = RunDir(output_dir)
    checkpoint_dir = run.checkpoints
    resume_from = resolve_resume_checkpoint(cfg.ckpt_path, run)
    changed_keys = check_resume_config(cfg, run, resume_from) if resume_from else []  # refuses before the imports
    if cfg.tracking.enabled:  # a tracking server that does not answer: said now, not after the imports and set-up
        from fcnseg.runs import check_reachable, resolve_tracking_uri

        check_reachable(resolve_tracking_uri(cfg.tracking.tracking_uri))

    import lightning as L

    from fcnseg.checkpointing import AtomicCheckpointIO, RelocatableCheckpoints
    from fcnseg.distributed import collective_failures_as_one_line

    if logging.getLogger().hasHandlers():
        # Lightning, imported after Hydra set up logging, lets its messages reach the root logger (Hydra's console
        # and train.log) and also prints them with a console handler of its own: one line each is enough
        logging.getLogger("lightning").handlers.clear()
    L.seed_everything(cfg.seed, workers=True)
    prepare_generated_data(cfg)
    datamodule = instantiate(cfg.data.datamodule)
    module = build_module(cfg)
    logger = run_dir.create_logger(cfg, run, resuming=resume_from is not None)
    callbacks = build_callbacks(cfg, checkpoint_dir)
    checkpoint = callbacks["best_checkpoint"]
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(trainer_cfg["precision"])
    earlier_rows = csv_rows_before(run, resume_from)
    loggers = build_loggers(cfg, output_dir) + ([logger] if logger else [])
    # RelocatableCheckpoints: no absolute path in a checkpoint, so a moved or pulled run dir resumes elsewhere
    callbacks = [*callbacks.values(), RelocatableCheckpoints(), *extra_callbacks]
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers, default_root_dir=str(output_dir),
                          plugins=[AtomicCheckpointIO()])
    if trainer.is_global_zero:  # the Trainer knows the global rank (torchrun, SLURM or Lightning's own launcher)
        output_dir.mkdir(parents=True, exist_ok=True)
        if not resume_from or changed_keys:  # the config the checkpoints were trained with
            run.write_config(cfg)
        if logger is not None:
            run_dir.open_run(logger, cfg, run, resumed=resume_from is not None, changed_keys=changed_keys)
    with collective_failures_as_one_line(trainer.global_rank, trainer.world_size, strategy_timeout_s(cfg.trainer),
                                         resume_command(output_dir)):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    best = Path(checkpoint.best_model_path or run.best)
    score = checkpoint.best_model_score
    if not trainer.is_global_zero:
        return {"best_checkpoint": str(best), "best_score": None if score is None else float(score), "run_id": None,
                "output_dir": str(output_dir)}
    return run_dir.finish(cfg, run, best, score, logger, earlier_rows=earlier_rows, evaluate=evaluate)


def strategy_timeout_s(trainer_cfg: DictConfig) -> float | None:
    strategy = trainer_cfg.get("strategy")
    timeout = strategy.get("timeout") if isinstance(strategy, DictConfig) else None
    return float(timeout.seconds) if isinstance(timeout, DictConfig) and "seconds" in timeout else None


def resume_command(output_dir: Path) -> str:
    """The command that continues this run from its last checkpoint: the same overrides, in the same run dir."""
    if not HydraConfig.initialized():  # a DVC stage (dvc repro / dvc exp run) or a Python caller
        return f"the same command (ckpt_path=last continues from {output_dir / 'checkpoints' / 'last.ckpt'})"
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("paths.output_dir=")]
    return "python -m fcnseg.train " + shlex.join([*overrides, f"paths.output_dir={output_dir}"])


def is_distributed(trainer_cfg: DictConfig) -> bool:
    strategy = trainer_cfg.get("strategy")
    name = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    return "ddp" in name.lower() or "DDPStrategy" in name


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=CONFIG_NAME)
def hydra_main(cfg: DictConfig) -> float | None:
    with exit_on_user_error():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN and is_distributed(cfg.trainer):
            if "submitit" not in str(hydra_cfg.launcher.get("_target_", "")):
                # Lightning's DDP launcher re-runs the command line once per rank, and a sweep's command line is
                # the whole sweep: each rank would start every job. Submitit starts each job's ranks itself.
                raise ConfigError(
                    "Hydra multirun (-m) with the basic launcher cannot run distributed jobs (trainer=ddp); run each "
                    "job as its own distributed job with the submitit launcher: `-m hydra/launcher=submitit_slurm "
                    "hydra.launcher.nodes=N hydra.launcher.tasks_per_node=G hydra.launcher.gpus_per_node=G` on "
                    "SLURM, or hydra/launcher=submitit_local here; or sweep with one command per job (`for m in "
                    "fcn32s fcn8s; do python -m fcnseg.train trainer=ddp model=$m; done`)"
                )
            from fcnseg.distributed import join_submitit_job

            join_submitit_job()
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


def expand_launcher_options(argv: list[str]) -> list[str]:
    """Two options for launchers that pass each value as one quoted argument (``mlflow run``'s MLproject):

    - ``--overrides "A=1 B='x y'"``: several Hydra overrides in one argument, split as a shell would;
    - ``--optional KEY=VALUE``: the override ``KEY=VALUE``, left out when VALUE is empty (the config's own value).
    """
    expanded, args = [], iter(argv)
    for arg in args:
        if arg in ("--overrides", "--optional"):
            value = next(args, None)
            if value is None:
                raise ConfigError(f"{arg} needs a value, e.g. {arg} 'trainer.devices=2'")
            if arg == "--overrides":
                expanded.extend(shlex.split(value))
            elif value.partition("=")[2]:
                expanded.append(value)
        else:
            expanded.append(arg)
    return expanded


def main() -> None:
    with exit_on_user_error():
        # in place: Lightning's DDP launcher starts the other ranks with this same command line
        sys.argv[1:] = expand_launcher_options(sys.argv[1:])
    precheck_overrides(CONFIG_DIR, CONFIG_NAME)
    run_dir = launcher_run_dir()
    if run_dir and not any(arg.startswith("hydra.run.dir=") for arg in sys.argv[1:]):
        sys.argv.append(f"hydra.run.dir={run_dir}")
    hydra_main()


def console_main() -> None:
    """The console script: ``main``, then the exit of a command that succeeded (:mod:`fcnseg.process_exit`)."""
    run_then_exit(main)


if __name__ == "__main__":
    run_then_exit(main)
