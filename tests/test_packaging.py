"""The built wheel carries what an installed fcnseg needs outside a checkout: the Hydra config tree and split lists."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from tests.tiny import ROOT


@pytest.mark.slow
def test_wheel_ships_the_config_tree_and_an_installed_copy_composes_it(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("fcnseg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"fcnseg/conf/config.yaml", "fcnseg/conf/trainer/ddp.yaml", "fcnseg/conf/experiment/quickstart.yaml",
            "fcnseg/data/splits/seg11valid.txt"} <= names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # -I: no checkout on the path, no editable finder; the installed copy alone must find and compose its config
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); sys.path.extend(sys.argv[2:]);"
             "from fcnseg.config import CONFIG_DIR, CONFIG_NAME; from hydra import compose, initialize_config_dir;"
             "initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3').__enter__();"
             "cfg = compose(CONFIG_NAME, ['experiment=quickstart']); print(CONFIG_DIR, cfg.model.name)")
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    out = subprocess.run([sys.executable, "-I", "-c", probe, str(target), *site_packages], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(target / "fcnseg" / "conf"), "fcn8s"]
