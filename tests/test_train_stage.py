"""The DVC train stage on its own (`python -m fcnseg.pipeline train`, as dvc.yaml runs it), in a scratch project:
offline with the default ImageNet backbone it fails in one line before it touches the previous run; a run of
another config is started over, and the old run, set aside meanwhile, is gone once the new one has finished."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fcnseg.pipeline import compose_params
from tests.servers import free_port
from tests.tiny import subprocess_env, tiny_overrides

STAGE_OVERRIDES = [o for o in tiny_overrides(__import__("pathlib").Path("."), epochs=1, tracking=False)
                   if not o.startswith(("paths.", "tracking.tracking_uri"))]


def stage(project, extra_env=None) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "fcnseg.pipeline", "train"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_offline_backbone_fails_in_one_line_before_the_old_run_is_touched_then_a_new_run_replaces_it(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.yaml").write_text("stages: {}\n")
    old = project / "artifacts" / "train"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.ckpt").write_text("the previous run")
    (old / "config.yaml").write_text("optim: {lr: 0.5}\n")

    compose_params(project / "params.yaml", [*STAGE_OVERRIDES, "model.net.width=1.0",
                                             "model.net.backbone_weights=imagenet"])
    closed = f"http://127.0.0.1:{free_port()}"  # every download goes through a proxy that refuses: offline
    offline = stage(project, {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": closed, "HTTPS_PROXY": closed,
                              "http_proxy": closed, "HTTP_PROXY": closed})
    assert offline.returncode == 2, offline.stderr[-3000:]
    output = (offline.stdout + offline.stderr).strip().splitlines()
    errors = [line for line in output if line.startswith("error: ")]
    assert len(errors) == 1 and "backbone_weights=null" in errors[0], output
    assert "Traceback" not in offline.stderr and len(output) <= 3, output
    assert (old / "checkpoints" / "last.ckpt").read_text() == "the previous run"  # nothing deleted or moved

    compose_params(project / "params.yaml", STAGE_OVERRIDES)  # from scratch: another config, trains
    fresh = stage(project)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "holds a run of another config" in fresh.stdout and "starting over" in fresh.stdout
    assert json.loads((old / "train_result.json").read_text())["best_checkpoint"] == "checkpoints/best.ckpt"
    assert (old / "checkpoints" / "best.ckpt").is_file()
    leftovers = list((project / ".dvc" / "tmp" / "fcnseg-runs").glob("*"))
    assert leftovers == [], leftovers  # the old run and the stash are removed once the new run is done
