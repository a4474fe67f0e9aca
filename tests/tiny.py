"""Overrides for tiny, fast training runs on CPU (synthetic VOC-format data, width-1/16 FCN, seconds per epoch).

Only sizes change: every default a user keeps (progress bar, callbacks, loggers, tracking) stays on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# The quick start's data and net, shrunk; the one list every tiny run (Hydra, DVC -S, MLproject) starts from.
# num_workers=0 saves worker start-up per run: the documented-command DDP tests keep the default workers.
TINY_SIZES = [
    "data.synthetic.num_train=16",
    "data.synthetic.num_val=6",
    "data.synthetic.num_test=4",
    "data.synthetic.height=48",
    "data.synthetic.width=48",
    "data.datamodule.train_transform.crop_size=48",
    "data.datamodule.batch_size=4",
    "data.datamodule.val_batch_size=3",
    "data.datamodule.num_workers=0",
    "model.net.width=0.0625",
]


def tiny_overrides(tmp: Path, *, epochs: int = 2, model: str = "fcn8s", tracking: bool = True) -> list[str]:
    return [
        "experiment=quickstart",
        f"model={model}",
        f"paths.data_dir={tmp / 'data'}",
        f"paths.output_dir={tmp / 'out'}",
        *TINY_SIZES,
        f"trainer.max_epochs={epochs}",
        "trainer.max_time=null",
        "trainer.log_every_n_steps=1",
        f"tracking.enabled={str(tracking).lower()}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "tracking.num_overlays=2",
    ]


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "fcnseg.train", *overrides]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    # mlflow.set_experiment() in earlier tests exports MLFLOW_EXPERIMENT_ID: no test's MLflow state leaks into a child
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                 "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    return env


def compose(overrides: list[str]):
    """The config ``python -m fcnseg.train <overrides>`` trains with, composed in this process (as its
    ``@hydra.main`` does: conf/, version_base 1.3)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fcnseg.config import CONFIG_DIR, CONFIG_NAME

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(CONFIG_NAME, overrides=list(overrides))


def train_in_process(overrides: list[str]) -> dict:
    """``fcnseg.train.train`` on ``overrides`` in this process, for tests where the training is an input, not what is
    tested: the same function the entry point calls, without paying for a new interpreter's imports."""
    from fcnseg.train import train

    return train(compose(overrides))
