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
from fcnseg.errors import CheckpointError, ConfigError, FcnsegError
from fcnseg.process_exit import run_then_exit
from fcnseg.run_dir import RunDir
from fcnseg.runs import read_metrics_csv

TRAIN_DIR = Path("artifacts/train")
BEST_CHECKPOINT = RunDir(TRAIN_DIR).best
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


def check_backbone(cfg: DictConfig) -> None:
    """The backbone weights training will load are there (torchvision's ImageNet VGG16 fetched into torch's cache,
    or a local file), else one line: checked before the stage touches the previous run."""
    weights = cfg.model.net.get("backbone_weights")
    if weights is None or cfg.model.get("finetune_from"):  # fine-tuning copies the backbone from its source
        return
    if weights != "imagenet":
        if not Path(str(weights)).is_file():
            raise CheckpointError(f"model.net.backbone_weights={weights} does not exist; pass a VGG16 state dict, "
                                  f"'imagenet' (torchvision's, downloaded once) or null (random init)")
        return
    import torch
    from torchvision.models import VGG16_Weights

    url = VGG16_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if cached.is_file():
        return
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), progress=True)
    except Exception as exc:  # offline, proxy, ...
        from fcnseg.errors import one_line

        raise CheckpointError(
            f"cannot get torchvision's VGG16 ImageNet weights ({one_line(exc, 120)}); nothing was changed. Download "
            f"{url} elsewhere and pass its path (-S model.net.backbone_weights=/path/vgg16.pth), or train from "
            f"scratch (-S model.net.backbone_weights=null)") from exc


def train(cfg: DictConfig) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from fcnseg import run_dir
    from fcnseg.train import train as run_training

    # The stage's outputs persist, so an interrupted `dvc repro` resumes from last.ckpt. `dvc exp run` (workspace,
    # --temp, --queue) first restores HEAD's outputs, so the stage also keeps its resumable state in a stash outside
    # the workspace, keyed by what it trains; an interrupted experiment, rerun, resumes from there. A run of another
    # config is started over (said, not silent), never resumed; the old run is set aside until the new one has a
    # checkpoint. Under trainer=ddp Lightning re-runs this command for the other local ranks (torchrun/SLURM start one
    # per rank): only rank 0 (known from the launcher's environment) touches the files.
    run = RunDir(TRAIN_DIR)
    config = OmegaConf.to_container(cfg, resolve=True)
    stash, aside = run_dir.stash_for(config), None
    if rank_zero_only.rank == 0:
        check_backbone(cfg)
        aside = run_dir.start_stage_run(run, stash, config)
    try:
        run_training(cfg, output_dir=TRAIN_DIR, evaluate=False,  # the evaluate stage evaluates, once
                     extra_callbacks=[run_dir.keeper_callback(stash, run, aside)])
    except BaseException:
        if rank_zero_only.rank == 0:
            run_dir.restore_aside(run, aside)
        raise
    if rank_zero_only.rank == 0:
        result = run.read_result()
        best = Path(result["best_checkpoint"])
        if best.resolve() != run.best.resolve():
            shutil.copy2(best, run.best)
        run_dir.drop(stash)
        run_dir.drop(aside)


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
    from fcnseg import run_dir
    from fcnseg.evaluate import evaluate_checkpoint, print_report, write_reports

    run = RunDir(TRAIN_DIR)
    if not run.best.is_file():
        raise FcnsegError(f"{run.best} not found; run the train stage first (dvc repro train)")
    tta = cfg.get("tta")  # test-time augmentation: none by default, -S tta=mmseg (conf/tta/)
    data = OmegaConf.to_container(cfg.data, resolve=True)  # the split is read as the data config says
    report = evaluate_checkpoint(run.best, cfg.data.root, cfg.data.datamodule.val_split,
                                 num_overlays=cfg.tracking.num_overlays, progress=True, tta=tta, data=data)
    write_reports(report, METRICS_FILE, PLOTS_DIR, history=epoch_history(run.metrics_csv))
    print_report(report)
    # A held-out split (the synthetic data's `test`): scored with the checkpoint selected on val, reported next to
    # val under that split's name in metrics.json (val stays at the top level: the registry gate compares val).
    test_split = cfg.data.get("test_split")
    test_report = None
    if test_split:
        test_report = evaluate_checkpoint(run.best, cfg.data.root, test_split, progress=True, tta=tta, data=data)
        metrics = json.loads(METRICS_FILE.read_text())
        metrics[test_split] = test_report.summary()
        METRICS_FILE.write_text(json.dumps(metrics, indent=2))
        print(f"held-out split {test_split!r}:")
        print_report(test_report)
    if cfg.tracking.enabled:  # into the MLflow run the train stage made (its record in the run dir)
        run_dir.evaluate_into_run(run, report, "val", "evaluation", extra_files=(METRICS_FILE,))
        if test_report is not None:
            run_dir.evaluate_into_run(run, test_report, test_split, f"evaluation/{test_split}")


def register(cfg: DictConfig) -> None:
    from fcnseg import lineage, registry

    run = RunDir(TRAIN_DIR)
    if not cfg.tracking.enabled:
        print("tracking.enabled=false: nothing to register")
        REGISTER_FILE.parent.mkdir(parents=True, exist_ok=True)
        REGISTER_FILE.write_text(json.dumps({"registered": False}))
        return
    result = run.read_result()
    if not result.get("model_uri"):
        raise FcnsegError(f"{run.result_file} has no logged model (tracking.log_model=false?); nothing to register")
    metrics = json.loads(METRICS_FILE.read_text())
    data_version = lineage.data_version(cfg.data.root)
    client = registry.client_for(run.read_record()["tracking_uri"])
    name = cfg.tracking.registered_model_name
    evaluation = lineage.evaluation_set(cfg.data.root, cfg.data.datamodule.val_split, data_version, cfg.data)
    existing = registry.registered_as(client, name, result["model_uri"])
    same_claim = existing is not None and (existing.tags or {}).get("val_mean_iou") == repr(float(metrics["mean_iou"])) \
        and all((existing.tags or {}).get(key) == value for key, value in evaluation.items())
    if same_claim:  # the stage re-ran without a new training run or a new score (e.g. only the overlay count changed)
        print(f"{name} v{existing.version} holds this training run's model with this evaluation already; "
              f"not registered again")
        REGISTER_FILE.parent.mkdir(parents=True, exist_ok=True)
        REGISTER_FILE.write_text(json.dumps({"registered": True, "name": name, "version": int(existing.version),
                                             "promoted": "champion" in (existing.aliases or []),
                                             "reason": "already registered"}, indent=2))
        return
    version = registry.register_model(
        result["model_uri"], name, val_mean_iou=metrics["mean_iou"],
        data_version=data_version, client=client, tags={"model": cfg.model.name, **lineage.dvc_experiment()},
        evaluation=evaluation, per_class_iou=metrics.get("per_class_iou"), lineage=lineage.dvc_lock_hashes(Path.cwd()),
    )
    decision = registry.promote(cfg.tracking.registered_model_name, version.version, client=client)
    print(decision.report())
    from fcnseg.runs import ui_links

    for line in ui_links(client.tracking_uri, model=(name, version.version)):
        print(f"MLflow {line}")
    REGISTER_FILE.parent.mkdir(parents=True, exist_ok=True)
    REGISTER_FILE.write_text(json.dumps({"registered": True, "name": cfg.tracking.registered_model_name,
                                         "version": int(version.version), "promoted": decision.promoted,
                                         "reason": decision.reason}, indent=2))


def compose_params(output: str | Path = "params.yaml", overrides: list[str] | None = None) -> None:
    """Writes params.yaml exactly as `dvc exp run` composes it from conf/ (so `dvc repro` sees the same)."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(output, CONFIG_DIR, None, CONFIG_NAME, "", list(overrides or []))


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/ composed with Hydra ``overrides``, as `dvc exp run -S` composes params.yaml."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose(CONFIG_NAME, overrides=list(overrides))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fcnseg.pipeline", description=__doc__)
    parser.add_argument("stage", choices=(*STAGES, "params"),
                        help="a dvc.yaml stage, or 'params' to recompose params.yaml from conf/ [overrides]")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides: with 'params', recomposed into params.yaml; with 'prepare', the config "
                             "it prepares is composed from conf/ with them (e.g. data=ade20k) instead of params.yaml")
    parser.add_argument("--params", default="params.yaml", help="composed config (default: params.yaml)")
    args = parser.parse_intermixed_args(argv)  # --params may come before or after the overrides
    with exit_on_user_error():
        if args.stage == "params":
            compose_params(args.params, args.overrides)
        elif args.stage == "prepare" and args.overrides:  # outside DVC: `prepare data=folder data.input=own_data`
            prepare(compose_config(args.overrides))
        else:
            globals()[args.stage](load_params(args.params))


if __name__ == "__main__":
    run_then_exit(main)
