"""fcnseg.data.prepare: end to end from a local HTTP server, local tarballs, killed runs, config dispatch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.data.prepare import is_complete, prepare, prepare_voc, sbd_root, voc_root
from fcnseg.errors import ConfigError, FetchError

# The HTTP server and tarball builders live in test_fetch.py; load them by path (no package __init__ needed).
_spec = importlib.util.spec_from_file_location("_fetch_test_helpers", Path(__file__).with_name("test_fetch.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
server, voc_bytes = helpers.server, helpers.voc_bytes  # fixtures
VOC_IDS, closed_port_url, resource_for = helpers.VOC_IDS, helpers.closed_port_url, helpers.resource_for


@pytest.fixture(autouse=True)
def extracted_cache(tmp_path, monkeypatch) -> Path:
    """Each test its own machine-wide extraction cache (the user's ~/.cache is never touched)."""
    cache = tmp_path / "extracted-cache"
    monkeypatch.setenv("FCNSEG_EXTRACTED_CACHE", str(cache))
    return cache


def _assert_ready_voc(root: Path) -> None:
    assert is_complete(root)
    for split, ids in VOC_IDS.items():
        assert (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split() == ids
        for image_id in ids:
            assert Image.open(root / "JPEGImages" / f"{image_id}.jpg").convert("RGB").size == (8, 8)
            label = Image.open(root / "SegmentationClass" / f"{image_id}.png")
            assert label.mode == "P" and set(np.unique(np.array(label))) == {0, 1, 255}


def test_prepare_voc_from_server_end_to_end(server, voc_bytes, tmp_path):
    resource = resource_for(voc_bytes, [closed_port_url(), server.url("/voc.tar")])

    root = prepare_voc(tmp_path / "data", progress=False, voc_resource=resource)

    assert root == tmp_path / "data" / "VOCdevkit" / "VOC2012" == voc_root(tmp_path / "data")
    _assert_ready_voc(root)
    assert (tmp_path / "data/downloads" / resource.filename).is_file()  # where data.dvc tracks it
    requests = len(server.requests)
    assert prepare_voc(tmp_path / "data", progress=False, voc_resource=resource) == root
    assert len(server.requests) == requests  # ready: no network


def test_downloaded_tarball_is_reused_without_network(voc_bytes, tmp_path):
    resource = resource_for(voc_bytes, [closed_port_url()])
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / resource.filename).write_bytes(voc_bytes)  # as `dvc pull` leaves it

    _assert_ready_voc(prepare_voc(tmp_path, progress=False, voc_resource=resource))


def test_local_tarball_accepted_and_wrong_one_refused(voc_bytes, tmp_path):
    resource = resource_for(voc_bytes, [closed_port_url()])
    wrong = tmp_path / "wrong.tar"
    wrong.write_bytes(voc_bytes[::-1])

    with pytest.raises(FetchError, match="wrong.tar"):
        prepare_voc(tmp_path / "data", tarball=wrong, progress=False, voc_resource=resource)
    assert not voc_root(tmp_path / "data").exists()

    good = tmp_path / "good.tar"
    good.write_bytes(voc_bytes)
    _assert_ready_voc(prepare_voc(tmp_path / "data", tarball=good, progress=False, voc_resource=resource))


def test_offline_prepare_fails_with_ways_out_and_leaves_nothing_ready(tmp_path):
    resource = resource_for(b"whatever", [closed_port_url()])

    with pytest.raises(FetchError, match="experiment=quickstart"):
        prepare_voc(tmp_path, progress=False, voc_resource=resource)
    assert not is_complete(voc_root(tmp_path))


def test_leftovers_of_a_killed_extraction_are_cleaned_and_prepare_completes(voc_bytes, tmp_path):
    resource = resource_for(voc_bytes, [closed_port_url()])
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / resource.filename).write_bytes(voc_bytes)
    root = voc_root(tmp_path)
    stale = root.parent / "VOC2012.tmp-abc123"  # a temp dir a killed run was extracting into
    (stale / "JPEGImages").mkdir(parents=True)
    (root / "JPEGImages").mkdir(parents=True)  # a root without marker: never ready
    (root / "JPEGImages" / "half-written.jpg").write_bytes(b"\xff\xd8")
    assert not is_complete(root)

    assert prepare_voc(tmp_path, progress=False, voc_resource=resource) == root

    _assert_ready_voc(root)
    assert not (root / "JPEGImages" / "half-written.jpg").exists()
    assert sorted(p.name for p in root.parent.iterdir()) == ["VOC2012"]


_PREPARE_SCRIPT = """
import json, sys
from fcnseg.data.fetch import Resource
from fcnseg.data.prepare import prepare_voc
spec = json.loads(sys.argv[2])
prepare_voc(sys.argv[1], progress=False, voc_resource=Resource(spec["filename"], spec["md5"], spec["size"],
                                                               tuple(spec["urls"])))
"""


def test_prepare_killed_mid_download_is_resumed_by_the_next_run(server, voc_bytes, tmp_path):
    resource = resource_for(voc_bytes, [server.url("/voc.tar")])
    server.stall_after = 4096  # send this much, then hang until killed
    spec = json.dumps({"filename": resource.filename, "md5": resource.md5, "size": resource.size,
                       "urls": list(resource.urls)})
    part = tmp_path / "downloads" / f"{resource.filename}.part"
    child = subprocess.Popen([sys.executable, "-c", _PREPARE_SCRIPT, str(tmp_path), spec])
    try:
        assert server.stalled.wait(60), "the prepare subprocess never reached the server"
        deadline = time.monotonic() + 30  # until the child has stored what it was sent
        while not (part.exists() and part.stat().st_size == 4096) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        child.kill()  # SIGKILL: no cleanup handlers run
        child.wait()
    assert not is_complete(voc_root(tmp_path))
    assert part.stat().st_size == 4096

    server.stall_after = None
    root = prepare_voc(tmp_path, progress=False, voc_resource=resource)

    assert server.requests[-1] == ("/voc.tar", "bytes=4096-")
    _assert_ready_voc(root)


def _sbd_tgz(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("benchmark_RELEASE/dataset/train.txt", b"2008_000002\n"),
                           ("benchmark_RELEASE/dataset/val.txt", b"2008_000003\n"),
                           ("benchmark_RELEASE/dataset/cls/2008_000002.mat", b"MATLAB 5.0"),
                           ("benchmark_RELEASE/dataset/img/2008_000002.jpg", b"\xff\xd8"),
                           ("benchmark_RELEASE/benchmark_code_RELEASE/README", b"not needed")]:
            helpers.add_member(tar, name, data)
    return path


def test_prepare_voc_with_sbd_from_local_tarballs(voc_bytes, tmp_path):
    voc = tmp_path / "voc.tar"
    voc.write_bytes(voc_bytes)
    sbd = _sbd_tgz(tmp_path / "benchmark.tgz")
    sbd_resource = resource_for(sbd.read_bytes(), [closed_port_url()], filename="benchmark.tgz", size=False)

    root = prepare_voc(tmp_path / "data", tarball=voc, sbd=True, sbd_tarball=sbd, progress=False,
                       voc_resource=resource_for(voc_bytes, [closed_port_url()]), sbd_resource=sbd_resource)

    _assert_ready_voc(root)
    dataset = sbd_root(tmp_path / "data")
    assert dataset == tmp_path / "data/SBD/benchmark_RELEASE/dataset"
    assert is_complete(dataset)
    assert (dataset / "train.txt").read_text().split() == ["2008_000002"]
    assert (dataset / "cls/2008_000002.mat").is_file() and (dataset / "img/2008_000002.jpg").is_file()


# ---------------------------------------------------------------- prepare(data_cfg, data_dir): the pipeline stage


def test_prepare_dispatches_voc_config(voc_bytes, tmp_path):
    tarball = tmp_path / "VOCtrainval_11-May-2012.tar"
    tarball.write_bytes(voc_bytes)
    data_dir = tmp_path / "data"
    cfg = {"source": "voc", "root": str(data_dir / "VOCdevkit/VOC2012"), "tarball": str(tarball), "sbd": False,
           "sbd_tarball": None}

    # The real pin cannot match a test tarball: give this one's (no network either way).
    root = prepare(cfg, str(data_dir), voc_resource=resource_for(voc_bytes, [closed_port_url()]))

    assert root == voc_root(data_dir)
    _assert_ready_voc(root)


def test_prepare_accepts_an_existing_voc_root_elsewhere_and_refuses_a_non_voc_one(tmp_path):
    elsewhere = tmp_path / "shared" / "VOC2012"
    for name in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (elsewhere / name).mkdir(parents=True)
    cfg = {"source": "voc", "root": str(elsewhere), "tarball": None, "sbd": False}

    assert prepare(cfg, tmp_path / "data") == elsewhere

    with pytest.raises(ConfigError, match="is not a VOC2012 directory"):
        prepare({**cfg, "root": str(tmp_path / "empty")}, tmp_path / "data")


def test_prepare_synthetic_writes_a_complete_voc_layout(tmp_path):
    cfg = {"source": "synthetic", "root": str(tmp_path / "synthetic/VOC2012"),
           "synthetic": {"seed": 0, "num_train": 2, "num_val": 1, "height": 16, "width": 16}}

    root = prepare(cfg, tmp_path)

    assert root == tmp_path / "synthetic/VOC2012"
    assert is_complete(root)
    assert len((root / "ImageSets/Segmentation/train.txt").read_text().split()) == 2


def test_prepare_unknown_source_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        prepare({"source": "coco"}, tmp_path)
    assert str(info.value) == "data.source='coco' is not known; valid sources: voc, synthetic, folder, ade20k, cityscapes"


# ---------------------------------------------------------------- data.dvc, the pin: what the prepare stage fetches


def test_the_pin_agrees_with_the_package_default_and_the_prepare_param():
    from omegaconf import OmegaConf

    from fcnseg.data.fetch import VOC2012_TRAINVAL
    from fcnseg.data.pin import read_pin

    root = Path(__file__).resolve().parents[2]
    pinned, path = read_pin(root / "data.dvc")
    assert (pinned.md5, pinned.size, pinned.filename) == (VOC2012_TRAINVAL.md5, VOC2012_TRAINVAL.size,
                                                          VOC2012_TRAINVAL.filename)
    assert pinned.urls[0] in VOC2012_TRAINVAL.urls
    assert path == root / "data" / "downloads" / pinned.filename
    params = OmegaConf.load(root / "params.yaml")
    assert params.data.pinned_md5 == pinned.md5 and params.data.prepare_dep == "src/fcnseg/data/pin.py"


def test_mirror_list_from_environment_then_config_then_pin(monkeypatch):
    from fcnseg.data.fetch import VOC2012_TRAINVAL
    from fcnseg.data.pin import MIRRORS_ENV, mirror_urls

    pinned = resource_for(b"x", ["http://pin.example/voc.tar"])
    monkeypatch.delenv(MIRRORS_ENV, raising=False)
    assert mirror_urls(pinned) == ("http://pin.example/voc.tar", *VOC2012_TRAINVAL.urls)
    assert mirror_urls(pinned, ["http://a/v.tar", "http://b/v.tar"]) == ("http://a/v.tar", "http://b/v.tar")
    monkeypatch.setenv(MIRRORS_ENV, " http://env1/v.tar  http://env2/v.tar ")
    assert mirror_urls(pinned, ["http://a/v.tar"]) == ("http://env1/v.tar", "http://env2/v.tar")


def _pinned_project(path: Path, voc_bytes: bytes, url: str) -> Path:
    """A DVC project (no git) whose data.dvc pins the test tarball, as the repository's pins the real one."""
    path.mkdir()
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"], cwd=path, check=True)
    resource = resource_for(voc_bytes, [url])
    (path / "data.dvc").write_text(
        f"frozen: true\ndeps:\n- path: {url}\nouts:\n- md5: {resource.md5}\n  size: {resource.size}\n  hash: md5\n"
        f"  path: data/downloads/{resource.filename}\n")
    return path


def test_fetch_with_a_local_tarball_then_prepare_stage_downloads_nothing(voc_bytes, tmp_path, monkeypatch):
    """`fcnseg fetch --tarball PATH` verifies it against data.dvc and stores it in DVC's cache (so `dvc push`
    sends it); the prepare stage then uses it with every mirror unreachable; a VOC tree extracted from another
    archive (a new pin) is replaced; with data/ gone, the tarball comes from DVC's cache."""
    from omegaconf import OmegaConf

    from fcnseg import cli, pipeline
    from fcnseg.data.pin import MIRRORS_ENV

    project = _pinned_project(tmp_path / "project", voc_bytes, closed_port_url())
    monkeypatch.chdir(project)
    monkeypatch.setenv(MIRRORS_ENV, closed_port_url())
    local = tmp_path / "VOCtrainval_11-May-2012.tar"
    local.write_bytes(voc_bytes)
    md5 = resource_for(voc_bytes, []).md5

    cli.main(["fetch", "--tarball", str(local)])

    cached = project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    assert cached.read_bytes() == voc_bytes
    assert not os.path.samefile(cached, local) and local.stat().st_mode & 0o200  # a copy: the user's stays writable
    root = voc_root(project / "data")
    _assert_ready_voc(root)
    marker = root / ".complete"
    marker.write_text(json.dumps({"archive": "VOCtrainval_11-May-2012.tar", "md5": "0" * 32}))  # an older pin's
    cfg = OmegaConf.create({"paths": {"data_dir": "data"}, "data": {
        "source": "voc", "root": "data/VOCdevkit/VOC2012", "tarball": None, "sbd": False, "sbd_tarball": None,
        "mirrors": None, "pinned_md5": md5}})

    pipeline.prepare(cfg)

    _assert_ready_voc(root)
    assert json.loads(marker.read_text())["md5"] == md5
    shutil.rmtree(project / "data")  # as in a `dvc exp run --temp` workspace: only DVC's cache has the tarball
    pipeline.prepare(cfg)
    _assert_ready_voc(root)
    with pytest.raises(ConfigError, match="data.pinned_md5"):
        pipeline.prepare(OmegaConf.merge(cfg, {"data": {"pinned_md5": "f" * 32}}))


def test_one_extraction_per_machine_is_shared_by_every_workspace(voc_bytes, tmp_path, extracted_cache):
    """The workspace and a queued experiment's temporary copy (another data_dir, no tarball there, offline) share
    one extraction: the second gets hard links to the first's files, and the same marker (same data version)."""
    resource = resource_for(voc_bytes, [closed_port_url()])
    tarball = tmp_path / "voc.tar"
    tarball.write_bytes(voc_bytes)
    workspace = prepare_voc(tmp_path / "workspace" / "data", tarball=tarball, progress=False, voc_resource=resource)
    [cached] = list(extracted_cache.glob("*/VOC2012"))
    assert cached.parent.name == resource.md5

    queued = prepare_voc(tmp_path / "exps" / "tmp1" / "data", progress=False, voc_resource=resource)  # offline
    _assert_ready_voc(queued)
    image = next((queued / "JPEGImages").iterdir())
    assert os.stat(image).st_ino == os.stat(workspace / "JPEGImages" / image.name).st_ino  # one copy on disk
    assert (queued / ".complete").read_bytes() == (workspace / ".complete").read_bytes()
    assert not (tmp_path / "exps" / "tmp1" / "data" / "downloads").exists()  # nothing fetched for it


def test_without_the_cache_each_workspace_extracts_its_own(voc_bytes, tmp_path, monkeypatch):
    monkeypatch.setenv("FCNSEG_EXTRACTED_CACHE", "off")
    resource = resource_for(voc_bytes, [closed_port_url()])
    tarball = tmp_path / "voc.tar"
    tarball.write_bytes(voc_bytes)
    first = prepare_voc(tmp_path / "a", tarball=tarball, progress=False, voc_resource=resource)
    with pytest.raises(FetchError):  # offline, no tarball: a second workspace cannot be prepared
        prepare_voc(tmp_path / "b", progress=False, voc_resource=resource)
    _assert_ready_voc(first)
