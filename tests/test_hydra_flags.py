"""Hydra's own flags work on `python -m fcnseg.train` (the override pre-check splits the command line as Hydra
does): `--cfg job`, `--cfg hydra`, `--info`; a bad override next to them is still one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.tiny import ROOT, subprocess_env


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcnseg.train", *args], capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(), timeout=120)


def test_cfg_job_prints_the_composed_config_with_overrides_applied():
    result = _train("--cfg", "job", "model=fcn16s", "optim.lr=0.002")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"]["net"]["name"] == "fcn16s" and cfg["optim"]["lr"] == 0.002
    assert "hydra" not in cfg  # the job's config only


@pytest.mark.parametrize("flags,needle", [(["--cfg", "hydra"], "run:"), (["--info", "defaults"], "Defaults List")])
def test_cfg_hydra_and_info_are_passed_to_hydra(flags, needle):
    result = _train(*flags)
    assert result.returncode == 0, result.stderr
    assert needle in result.stdout


def test_cfg_job_with_a_bad_override_is_one_line():
    from fcnseg.cli_errors import precheck_overrides
    from fcnseg.config import CONFIG_DIR

    for argv in (["--cfg", "job"], ["--cfg", "job", "--package", "model", "model=fcn16s"], ["--info"],
                 ["-m", "model=fcn32s,fcn16s"]):
        precheck_overrides(CONFIG_DIR, "config", argv)  # passes: no override taken for a flag value
    with pytest.raises(SystemExit) as info:
        precheck_overrides(CONFIG_DIR, "config", ["--cfg", "job", "model=fcn7s"])
    assert info.value.code == 2
