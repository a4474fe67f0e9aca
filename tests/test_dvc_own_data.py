"""Own data under DVC, for real: a folder the user tracks with `dvc add` is the prepare stage's dependency; `dvc repro
prepare` builds data.root from it (split recorded), the data version is the folder's DVC hash, and a new version of
the folder (`dvc add` again) re-runs prepare and changes the data version. Prepare only: the other stages run on
whatever prepare builds, as for VOC (tests/test_dvc_voc_pipeline.py)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.own_data import write_folder_dataset
from tests.test_dvc_voc_pipeline import DVC, dvc_project_copy, sh

DATA_VERSION = ("from fcnseg import lineage; import json, sys; "
                "print(json.dumps([lineage.data_version('data/own'), "
                "lineage.tracked_input({'input': 'own_data'})]))")


@pytest.mark.slow  # ~25 s of dvc subprocesses
def test_dvc_add_own_folder_then_repro_prepare_records_its_dvc_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("FCNSEG_EXTRACTED_CACHE", "off")
    project = dvc_project_copy(tmp_path / "project")
    data = write_folder_dataset(project / "own_data", split_files=False, num_train=5, num_val=2)
    sh(project, DVC, "add", "-q", "own_data")
    sh(project, sys.executable, "-m", "fcnseg.pipeline", "params", "data=folder",
       "data.class_names=[background,road,car]")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "own data")
    added = yaml.safe_load((project / "own_data.dvc").read_text())["outs"][0]["md5"]
    assert added.endswith(".dir")

    repro = sh(project, DVC, "repro", "prepare")
    assert "Running stage 'prepare'" in repro.stdout, repro.stdout
    prepared = project / "data" / "own"
    assert (prepared / ".complete").is_file()
    train, val = ((prepared / "splits" / f"{s}.txt").read_text().split() for s in ("train", "val"))
    assert sorted(train + val) == data.splits["all"] and val  # the ratio split, recorded in the prepared data
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["prepare"]
    assert any(dep["path"] == "own_data" and dep["md5"] == added for dep in lock["deps"]), lock
    version, tracked = json.loads(sh(project, sys.executable, "-c", DATA_VERSION).stdout)
    assert version == added  # the folder's DVC hash, not a hash of the prepared copy or of data.dvc's tarball
    assert tracked == {"path": "own_data", "dvc_file": "own_data.dvc", "md5": added}
    assert "changed" not in sh(project, DVC, "status", "prepare").stdout

    # a new version of the data: one more image, `dvc add` again -> prepare re-runs, the data version follows
    label = data.labels["scene_000"]
    Image.fromarray(np.zeros((*label.shape, 3), dtype=np.uint8)).save(project / "own_data" / "images" / "new.jpg")
    Image.fromarray(label).save(project / "own_data" / "masks" / "new.png")
    sh(project, DVC, "add", "-q", "own_data")
    readded = yaml.safe_load((project / "own_data.dvc").read_text())["outs"][0]["md5"]
    assert readded != added
    assert "Running stage 'prepare'" in sh(project, DVC, "repro", "prepare").stdout
    assert (prepared / "images" / "new.jpg").is_file()
    assert json.loads(sh(project, sys.executable, "-c", DATA_VERSION).stdout)[0] == readded
