"""lineage.git_state inside a DVC experiment, in process on a real `git init` + `dvc init` repository: what DVC
applied (params, dvc.lock, stage outputs) is not "dirty", any other change is; the experiment's name and baseline
are recorded, and its commit resolves from the ref DVC makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fcnseg import lineage

DVC = str(Path(sys.executable).with_name("dvc"))
GIT = ["git", "-c", "user.email=t@fcnseg.invalid", "-c", "user.name=test"]


def repo(path: Path) -> str:
    (path / "src").mkdir(parents=True)
    (path / "src" / "train.py").write_text("print('train')\n")
    (path / "params.yaml").write_text("lr: 0.1\n")
    (path / "dvc.yaml").write_text("stages:\n  train:\n    cmd: python src/train.py\n    params: [lr]\n"
                                   "    outs: [model.bin]\n    metrics: [{metrics.json: {cache: false}}]\n")
    (path / "metrics.json").write_text("{}\n")
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], ["git", "add", "-A"], [*GIT, "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()


def test_what_dvc_applied_is_not_dirty_but_a_source_change_is(tmp_path):
    baseline = repo(tmp_path)
    experiment = {lineage.EXP_NAME: "fatty-snap", lineage.EXP_BASELINE: baseline}
    (tmp_path / "params.yaml").write_text("lr: 0.01\n")  # `dvc exp run -S lr=0.01` wrote it
    (tmp_path / "metrics.json").write_text('{"mean_iou": 0.5}\n')  # a stage output
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    state = lineage.git_state(tmp_path, experiment)
    assert state == {lineage.GIT_COMMIT: baseline, lineage.GIT_DIRTY: "false", **experiment}
    assert lineage.git_state(tmp_path, {})[lineage.GIT_DIRTY] == "true"  # outside an experiment: all of it counts

    (tmp_path / "src" / "train.py").write_text("print('changed by hand')\n")  # a real uncommitted change
    assert lineage.git_state(tmp_path, experiment)[lineage.GIT_DIRTY] == "true"


def test_the_experiments_commit_resolves_from_its_ref(tmp_path):
    baseline = repo(tmp_path)
    assert lineage.exp_commit(tmp_path, baseline, "fatty-snap") is None  # not committed by DVC (yet)
    subprocess.run(["git", "update-ref", lineage.exp_ref(baseline, "fatty-snap"), baseline], cwd=tmp_path, check=True)
    assert lineage.exp_commit(tmp_path, baseline, "fatty-snap") == baseline
    assert lineage.exp_ref(baseline, "fatty-snap") == f"refs/exps/{baseline[:2]}/{baseline[2:]}/fatty-snap"
