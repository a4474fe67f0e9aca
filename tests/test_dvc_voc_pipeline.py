"""The full VOC pipeline under DVC, for real, on fresh `git init` + `dvc init` copies of the project, with a test-built
VOC tarball pinned in data.dvc and served by a mirror on 127.0.0.1:

- offline with nothing in place, `dvc repro` ends in one line naming the ways out (never DVC's "missing data");
- `dvc repro` fetches the pinned tarball itself through fcnseg's fetcher (the mirror list from the environment);
- team remote round trip: `dvc push`, a fresh `git clone`, `dvc pull`, `dvc repro` runs every stage, downloads nothing;
- a stage re-runs only when what it uses changes: batch size, workers, augmentation, mirrors or a local tarball path
  leave prepare (extraction) unchanged, while batch size and augmentation change train.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.data.test_fetch import FileServer, closed_port_url, voc_tarball_bytes
from tests.test_pipeline_e2e import project_files
from tests.tiny import ROOT, subprocess_env

DVC = str(Path(sys.executable).with_name("dvc"))
TARBALL = "VOCtrainval_11-May-2012.tar"
# The VOC config as it is, shrunk: a width-1/16 FCN-8s from scratch, one epoch over the tarball's 8x8 images.
VOC_TINY = ["model=fcn8s", "model.net.width=0.0625", "model.net.backbone_weights=null", "trainer=cpu",
            "trainer.max_epochs=1",
            "data.datamodule.batch_size=2", "data.datamodule.val_batch_size=1", "data.datamodule.num_workers=0",
            "data.datamodule.pin_memory=false", "data.datamodule.train_transform.crop_size=48",
            "tracking.enabled=false"]
GIT_ID = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@fcnseg.invalid",
          "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@fcnseg.invalid"}


def sh(project: Path, *args: str, mirrors: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in dvc.yaml = this venv's
    env["PYTHONPATH"] = str(project / "src")  # the copy's code, not the checkout's
    env.update(GIT_ID)
    env.pop("FCNSEG_VOC_MIRRORS", None)
    if mirrors is not None:
        env["FCNSEG_VOC_MIRRORS"] = mirrors
    result = subprocess.run(list(args), cwd=project, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def dvc_project_copy(path: Path) -> Path:
    """The project's files copied to ``path``, made a git + DVC repository (nothing committed yet)."""
    for name in project_files():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, path / name)
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], [DVC, "config", "hydra.enabled", "true"],
                [DVC, "config", "core.analytics", "false"]):
        sh(path, *cmd)
    return path


def pinned_project(path: Path, tarball: bytes, url: str) -> Path:
    """The project as committed, with data.dvc pinning the test tarball at ``url`` and params.yaml composed from
    the VOC defaults, shrunk."""
    dvc_project_copy(path)
    md5 = hashlib.md5(tarball).hexdigest()
    pin = yaml.safe_load((path / "data.dvc").read_text())
    pin["deps"][0]["path"] = url
    pin["outs"][0].update(md5=md5, size=len(tarball))
    (path / "data.dvc").write_text(yaml.safe_dump({k: v for k, v in pin.items() if k != "md5"}, sort_keys=False))
    from dvc.repo import Repo
    from dvc.stage.utils import compute_md5

    repo = Repo(str(path))
    try:  # the pin's own checksum, as `dvc import-url` writes it (else `dvc status` says "changed checksum")
        pin["md5"] = compute_md5(repo.stage.collect(str(path / "data.dvc"))[0])
    finally:
        repo.close()
    (path / "data.dvc").write_text(yaml.safe_dump(pin, sort_keys=False))
    for cmd in ([sys.executable, "-m", "fcnseg.pipeline", "params", *VOC_TINY, f"data.pinned_md5={md5}"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        sh(path, *cmd)
    return path


def stored(store: Path, md5: str) -> Path:
    """Where a DVC cache or remote (same layout) keeps the file of that MD5."""
    return store / "files" / "md5" / md5[:2] / md5[2:]


@pytest.fixture(autouse=True)
def extracted_cache(tmp_path, monkeypatch):
    """A machine-wide extraction cache of the test's own (inherited by every dvc/stage subprocess)."""
    monkeypatch.setenv("FCNSEG_EXTRACTED_CACHE", str(tmp_path / "extracted-cache"))


@pytest.fixture
def mirror():
    tarball = voc_tarball_bytes()
    srv = FileServer({"/voc.tar": tarball})
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv, tarball
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.mark.slow
def test_dvc_repro_fetches_voc_itself_and_a_team_remote_round_trip_downloads_nothing(mirror, tmp_path):
    srv, tarball = mirror
    md5 = hashlib.md5(tarball).hexdigest()
    url = srv.url("/voc.tar")
    first = pinned_project(tmp_path / "first", tarball, url)

    # offline, nothing in place: one line naming the ways out, nothing half-written, never DVC's "missing data"
    offline = sh(first, DVC, "repro", mirrors=closed_port_url(), check=False)
    assert offline.returncode != 0
    output = offline.stdout + offline.stderr
    assert "missing data" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    for way_out in ("fcnseg fetch --tarball PATH", "dvc pull", "experiment=quickstart"):
        assert way_out in errors[0]
    assert not (first / "data" / "downloads" / TARBALL).exists() and srv.requests == []

    # with a mirror (first in the list unreachable): `dvc repro` fetches the pinned tarball through fcnseg's
    # fetcher, stores it in DVC's cache (data.dvc in place: `dvc push` has it to send), and runs every stage
    sh(first, DVC, "repro", mirrors=f"{closed_port_url()} {url}")
    assert srv.requests == [("/voc.tar", None)]
    assert (first / "data" / "downloads" / TARBALL).read_bytes() == tarball
    assert stored(first / ".dvc" / "cache", md5).read_bytes() == tarball
    assert os.path.samefile(stored(first / ".dvc" / "cache", md5), first / "data" / "downloads" / TARBALL)  # 1 copy
    assert 0.0 <= json.loads((first / "metrics.json").read_text())["mean_iou"] <= 1.0
    assert "changed" not in sh(first, DVC, "status").stdout + sh(first, DVC, "status", "data.dvc").stdout

    # the team remote: push the pinned tarball and the trained outputs, commit the lock
    remote = tmp_path / "team-remote"
    sh(first, DVC, "remote", "add", "-d", "team", str(remote))
    sh(first, "git", "add", "-A")
    sh(first, "git", "commit", "-qm", "VOC run, team remote")
    sh(first, DVC, "push")
    assert stored(remote, md5).read_bytes() == tarball

    # a teammate: fresh clone, `dvc pull`, `dvc repro` extracts the pulled tarball and downloads nothing (the
    # mirror is up: a download would show in its request log); the same data, so training is not repeated
    second = tmp_path / "second"
    sh(tmp_path, "git", "clone", "-q", str(first), str(second))
    sh(second, DVC, "pull")
    assert (second / "data" / "downloads" / TARBALL).read_bytes() == tarball
    repro = sh(second, DVC, "repro", mirrors=url)
    assert len(srv.requests) == 1
    assert "Running stage 'prepare'" in repro.stdout and "Running stage 'train'" not in repro.stdout, repro.stdout
    assert (second / "data" / "VOCdevkit" / "VOC2012" / ".complete").is_file()
    assert "changed" not in sh(second, DVC, "status").stdout

    # only what a stage uses re-runs it: batch size, workers, augmentation, mirrors, a local tarball path
    params = yaml.safe_load((second / "params.yaml").read_text())
    datamodule = params["data"]["datamodule"]
    datamodule.update(batch_size=1, num_workers=1)
    datamodule["train_transform"].update(hflip=False, color_jitter=0.3)
    params["data"].update(mirrors=["http://127.0.0.1:9/voc.tar"], tarball="/elsewhere/voc.tar")
    (second / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(sh(second, DVC, "status", "--json").stdout)
    assert "prepare" not in status, status  # no re-extraction
    changed = status["train"][0]["changed deps"]["params.yaml"]
    # what trains differently re-runs train; the workers (how fast data loads) do not
    assert {"data.datamodule.batch_size", "data.datamodule.train_transform"} == set(changed), status
