"""The Hydra config tree: every group composes, params.yaml is what DVC composes, bad overrides are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=overrides)


def test_committed_params_yaml_is_what_dvc_composes(tmp_path):
    """`dvc repro` reads params.yaml as committed; it must equal the composition of conf/ with no overrides."""
    from dvc.utils.hydra import compose_and_dump

    fresh = tmp_path / "params.yaml"
    compose_and_dump(fresh, str(CONF), None, "config", "", [])
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == yaml.safe_load(fresh.read_text()), (
        "params.yaml is stale: regenerate it with `python -m fcnseg.pipeline params`"
    )


@pytest.mark.parametrize("group,options", [
    ("model", ["fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"]),
    ("data", ["voc", "voc_sbd", "synthetic"]),
    ("optim", ["sgd", "sgd_poly", "adamw"]),
    ("trainer", ["default", "cpu", "gpu", "ddp"]),
    ("experiment", ["quickstart", "voc"]),
])
def test_every_config_group_option_composes_and_resolves(group, options):
    for option in options:
        cfg = _compose([f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=True)  # no dangling interpolation
        if group == "model":
            assert cfg.model.net.name == cfg.model.name == option


def test_quickstart_is_offline_tiny_and_cpu():
    cfg = _compose(["experiment=quickstart"])
    assert cfg.data.source == "synthetic"
    assert cfg.model.net.backbone_weights is None  # nothing to download
    assert cfg.model.net.width == 0.125
    assert cfg.trainer.accelerator == "cpu"
    # the prepare stage must not depend on the VOC tarball (data.dvc), or a fresh clone could not run it offline
    assert "VOCtrainval" not in cfg.data.prepare_dep


def test_sweep_composes_each_model():
    names = {_compose([f"model={name}"]).model.net.name for name in ("fcn32s", "fcn16s", "fcn8s")}
    assert names == {"fcn32s", "fcn16s", "fcn8s"}


@pytest.mark.parametrize("override,needle", [
    ("model=fcn7s", "fcn7s"),
    ("=5", None),
    ("trainer.max_epochs=[1,", None),
    ("no_such_key=1", "no_such_key"),
])
def test_bad_override_ends_in_one_clear_line(override, needle):
    result = subprocess.run([sys.executable, "-m", "fcnseg.train", override], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    if needle:
        assert needle in lines[0]


def test_unknown_model_name_in_python_is_one_line():
    from fcnseg.errors import ConfigError
    from fcnseg.models import build_fcn

    with pytest.raises(ConfigError) as info:
        build_fcn("fcn4s")
    assert "\n" not in str(info.value) and "fcn8s" in str(info.value)
