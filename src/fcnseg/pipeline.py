"""The DVC pipeline's stages (dvc.yaml): prepare → train → evaluate → register.

Each stage reads the fully composed ``params.yaml`` (DVC composes it from ``conf/`` on ``dvc exp run -S …``),
so ``dvc exp run -S model=fcn16s`` trains FCN-16s. Run one by hand with ``python -m fcnseg.pipeline STAGE``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fcnseg.cli_errors import exit_on_user_error
from fcnseg.config import CONFIG_DIR, CONFIG_NAME
from fcnseg.errors import ConfigError, FcnsegError
from fcnseg.runs import read_metrics_csv, read_run_record

TRAIN_DIR = Path("artifacts/train")
BEST_CHECKPOINT = TRAIN_DIR / "checkpoints" / "best.ckpt"
METRICS_FILE = Path("metrics.json")
PLOTS_DIR = Path("plots")
REGISTER_FILE = Path("artifacts/register.json")
STAGES = ("prepare", "train", "evaluate", "register")


def load_params(path: str | Path = "params.yaml") -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the project root (where dvc.yaml is)")
    return OmegaConf.load(path)


def prepare(cfg: DictConfig) -> None:
    from fcnseg.data.prepare import prepare as prepare_data

    prepare_data(OmegaConf.to_container(cfg.data, resolve=True), cfg.paths.data_dir)


def train(cfg: DictConfig) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from fcnseg.train import RUN_CONFIG, config_differences, train as run_training

    # The stage's outputs persist, so an interrupted `dvc repro` resumes from last.ckpt. DVC re-runs this stage when
    # its params change: a run of another config is then started over (said, not silent), never resumed.
    # Under trainer=ddp Lightning re-runs this command for the other local ranks (torchrun/SLURM start one per rank):
    # only rank 0 (known from the launcher's environment) touches the files.
    recorded = TRAIN_DIR / RUN_CONFIG
    if rank_zero_only.rank == 0 and TRAIN_DIR.exists():
        differing = (config_differences(OmegaConf.to_container(OmegaConf.load(recorded)),
                                        OmegaConf.to_container(cfg, resolve=True))
                     if recorded.is_file() else ["(no recorded config)"])
        if differing:
            print(f"{TRAIN_DIR} holds a run of another config (differs in: {', '.join(differing[:8])}); "
                  f"starting over", flush=True)
            shutil.rmtree(TRAIN_DIR)
    cfg.tracking.evaluate_after_training = False  # the evaluate stage evaluates and logs into the run, once
    result = run_training(cfg, output_dir=TRAIN_DIR)
    best = Path(result["best_checkpoint"])
    if rank_zero_only.rank == 0 and best.resolve() != BEST_CHECKPOINT.resolve():
        shutil.copy2(best, BEST_CHECKPOINT)


def epoch_history(metrics_csv: Path) -> list[dict[str, float]]:
    """Per-epoch rows (epoch, train/loss, val/loss, val/mean_iou, …) from Lightning's CSVLogger file."""
    by_epoch: dict[int, dict[str, float]] = {}
    for row in read_metrics_csv(metrics_csv):
        if not row.get("epoch"):
            continue
        epoch = int(float(row["epoch"]))
        entry = by_epoch.setdefault(epoch, {"epoch": epoch})
        for key, value in row.items():
            if value and (key.endswith("_epoch") or key.startswith("val/")) and "/iou/" not in key:
                entry[key.removesuffix("_epoch")] = float(value)
    return [by_epoch[e] for e in sorted(by_epoch)]


def evaluate(cfg: DictConfig) -> None:
    from fcnseg.evaluate import evaluate_checkpoint, print_report, write_reports

    if not BEST_CHECKPOINT.is_file():
        raise FcnsegError(f"{BEST_CHECKPOINT} not found; run the train stage first (dvc repro train)")
    report = evaluate_checkpoint(BEST_CHECKPOINT, cfg.data.root, cfg.data.datamodule.val_split,
                                 num_overlays=cfg.tracking.num_overlays, progress=True)
    write_reports(report, METRICS_FILE, PLOTS_DIR, history=epoch_history(TRAIN_DIR / "metrics.csv"))
    print_report(report)
    # A held-out split (the synthetic data's `test`): scored with the checkpoint selected on val, reported next to
    # val under that split's name in metrics.json (val stays at the top level: the registry gate compares val).
    test_split = cfg.data.get("test_split")
    test_report = None
    if test_split:
        test_report = evaluate_checkpoint(BEST_CHECKPOINT, cfg.data.root, test_split, progress=True)
        metrics = json.loads(METRICS_FILE.read_text())
        metrics[test_split] = test_report.summary()
        METRICS_FILE.write_text(json.dumps(metrics, indent=2))
        print(f"held-out split {test_split!r}:")
        print_report(test_report)
    run = read_run_record(TRAIN_DIR)
    if cfg.tracking.enabled and run:
        import mlflow

        from fcnseg.publish import log_evaluation

        client = mlflow.MlflowClient(run["tracking_uri"])
        log_evaluation(client, run["run_id"], report, prefix="val", artifact_dir="evaluation")
        if test_report is not None:
            log_evaluation(client, run["run_id"], test_report, prefix=test_split,
                           artifact_dir=f"evaluation/{test_split}")
        client.log_artifact(run["run_id"], str(METRICS_FILE), "evaluation")


def register(cfg: DictConfig) -> None:
    from fcnseg import lineage, registry

    result_file = TRAIN_DIR / "train_result.json"
    if not cfg.tracking.enabled:
        print("tracking.enabled=false: nothing to register")
        REGISTER_FILE.parent.mkdir(parents=True, exist_ok=True)
        REGISTER_FILE.write_text(json.dumps({"registered": False}))
        return
    result = json.loads(result_file.read_text())
    if not result.get("model_uri"):
        raise FcnsegError(f"{result_file} has no logged model (tracking.log_model=false?); nothing to register")
    metrics = json.loads(METRICS_FILE.read_text())
    data_version = lineage.data_version(cfg.data.root)
    client = registry.client_for(read_run_record(TRAIN_DIR)["tracking_uri"])
    version = registry.register_model(
        result["model_uri"], cfg.tracking.registered_model_name, val_mean_iou=metrics["mean_iou"],
        data_version=data_version, client=client, tags={"model": cfg.model.name},
        evaluation=lineage.evaluation_set(cfg.data.root, cfg.data.datamodule.val_split, data_version),
        per_class_iou=metrics.get("per_class_iou"), lineage=lineage.dvc_lock_hashes(Path.cwd()),
    )
    decision = registry.promote(cfg.tracking.registered_model_name, version.version, client=client)
    print(decision.report())
    REGISTER_FILE.parent.mkdir(parents=True, exist_ok=True)
    REGISTER_FILE.write_text(json.dumps({"registered": True, "name": cfg.tracking.registered_model_name,
                                         "version": int(version.version), "promoted": decision.promoted,
                                         "reason": decision.reason}, indent=2))


def compose_params(output: str | Path = "params.yaml", overrides: list[str] | None = None) -> None:
    """Writes params.yaml exactly as `dvc exp run` composes it from conf/ (so `dvc repro` sees the same)."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(output, CONFIG_DIR, None, CONFIG_NAME, "", list(overrides or []))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fcnseg.pipeline", description=__doc__)
    parser.add_argument("stage", choices=(*STAGES, "params"),
                        help="a dvc.yaml stage, or 'params' to recompose params.yaml from conf/ [overrides]")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (only with 'params')")
    parser.add_argument("--params", default="params.yaml", help="composed config (default: params.yaml)")
    args = parser.parse_intermixed_args(argv)  # --params may come before or after the overrides
    with exit_on_user_error():
        if args.stage == "params":
            compose_params(args.params, args.overrides)
        else:
            globals()[args.stage](load_params(args.params))


if __name__ == "__main__":
    main()
