"""The prepare stage for datasets beyond VOC: ADE20K's zip fetched from a 127.0.0.1 server (mirrors, resume, MD5,
safe zip extraction), Cityscapes from the user's zips (checked by MD5, one line when missing), own data from a
folder or an archive (hard links / extraction, the ratio split written into the prepared data)."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fcnseg.config import CONFIG_DIR
from fcnseg.data import open_split
from fcnseg.data.fetch import safe_extract
from fcnseg.data.prepare import prepare
from fcnseg.errors import ConfigError, FetchError
from tests.data.test_fetch import FileServer, closed_port_url
from tests.own_data import write_ade20k_dataset, write_cityscapes_dataset, write_folder_dataset


@pytest.fixture(autouse=True)
def _own_extraction_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FCNSEG_EXTRACTED_CACHE", str(tmp_path / "extracted-cache"))


def data_config(overrides: list[str]) -> dict:
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return OmegaConf.to_container(compose("config", overrides=overrides).data, resolve=True)


def zip_tree(source: Path, prefix: str, extra: dict[str, bytes] | None = None) -> bytes:
    """``source``'s files as a zip under ``prefix/`` (as the real archives are laid out)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                zf.write(path, f"{prefix}/{path.relative_to(source)}" if prefix else str(path.relative_to(source)))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def ade_zip(tmp_path) -> bytes:
    data = write_ade20k_dataset(tmp_path / "made" / "ADEChallengeData2016", num_train=2, num_val=1)
    return zip_tree(data.root, "ADEChallengeData2016", {"ADEChallengeData2016/objectInfo150.txt": b"Idx\n"})


@pytest.fixture
def server(ade_zip):
    srv = FileServer({"/ADEChallengeData2016.zip": ade_zip})
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_ade20k_is_fetched_from_the_second_mirror_resumed_and_extracted(server, ade_zip, tmp_path):
    server.cut_after, server.cut_times = len(ade_zip) // 3, 1  # the first transfer stops midway: resumed
    md5 = hashlib.md5(ade_zip).hexdigest()
    cfg = data_config(["data=ade20k", f"paths.data_dir={tmp_path / 'data'}", f"data.md5={md5}",
                       f"data.mirrors=[{closed_port_url('a.zip')},{server.url('/ADEChallengeData2016.zip')}]"])
    root = prepare(cfg, tmp_path / "data")
    assert root == tmp_path / "data" / "ADEChallengeData2016"
    assert (root / ".complete").is_file() and (root / "objectInfo150.txt").is_file()
    assert any(rng for _, rng in server.requests if rng)  # the second request asked for the rest only
    assert (tmp_path / "data" / "downloads" / "ADEChallengeData2016.zip").read_bytes() == ade_zip
    assert len(open_split(cfg, "training")) == 2
    assert set(np.unique(open_split(cfg, "validation")[0][1])) <= {*range(150), 255}
    # prepared once: a second prepare neither downloads nor extracts again
    count = len(server.requests)
    assert prepare(cfg, tmp_path / "data") == root and len(server.requests) == count


def test_ade20k_wrong_md5_is_refused_in_one_line(server, tmp_path):
    cfg = data_config(["data=ade20k", f"paths.data_dir={tmp_path / 'data'}",
                       f"data.mirrors=[{server.url('/ADEChallengeData2016.zip')}]"])  # the real zip's MD5
    with pytest.raises(FetchError) as err:
        prepare(cfg, tmp_path / "data")
    assert "7328b3957e407ddae1d3cbf487f149ef" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "data" / "ADEChallengeData2016").exists()


def test_ade20k_local_archive_is_verified_and_used_offline(ade_zip, tmp_path):
    archive = tmp_path / "ADEChallengeData2016.zip"
    archive.write_bytes(ade_zip)
    cfg = data_config(["data=ade20k", f"paths.data_dir={tmp_path / 'data'}", f"data.archive={archive}",
                       f"data.md5={hashlib.md5(ade_zip).hexdigest()}", f"data.mirrors=[{closed_port_url()}]"])
    root = prepare(cfg, tmp_path / "data")
    assert len(open_split(cfg, "training")) == 2 and root.is_dir()


@pytest.mark.parametrize("name", ["../evil.txt", "ADEChallengeData2016/../../evil.txt", "/tmp/evil-zip-abs"])
def test_unsafe_zip_member_is_refused_and_nothing_left(tmp_path, name):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ADEChallengeData2016/images/training/a.jpg", b"x")
        zf.writestr(name, b"pwned")
    with pytest.raises(FetchError, match="unsafe"):
        safe_extract(archive, tmp_path / "out" / "ADE", subdir="ADEChallengeData2016")
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil-zip-abs").exists()


def test_zip_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("top/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(FetchError, match="symbolic link"):
        safe_extract(archive, tmp_path / "out")


def cityscapes_zips(tmp_path) -> dict[str, Path]:
    data = write_cityscapes_dataset(tmp_path / "made", num_train=1, num_val=1)
    zips = {}
    for key, filename in (("leftImg8bit", "leftImg8bit_trainvaltest.zip"), ("gtFine", "gtFine_trainvaltest.zip")):
        zips[key] = tmp_path / filename
        zips[key].write_bytes(zip_tree(data.root / key, key, {"README": b"cityscapes", "license.txt": b"terms"}))
    return zips


def test_cityscapes_from_local_zips_checked_by_md5(tmp_path):
    zips = cityscapes_zips(tmp_path)
    md5 = {key: hashlib.md5(path.read_bytes()).hexdigest() for key, path in zips.items()}
    cfg = data_config(["data=cityscapes", f"paths.data_dir={tmp_path / 'data'}",
                       *(f"data.zips.{k}={p}" for k, p in zips.items()), *(f"data.md5.{k}={v}" for k, v in md5.items())])
    root = prepare(cfg, tmp_path / "data")
    assert sorted(p.name for p in root.iterdir()) == [".complete", "gtFine", "leftImg8bit"]
    assert set(np.unique(open_split(cfg, "val")[0][1])) <= {*range(19), 255}
    wrong = {**cfg, "md5": {**md5, "gtFine": "0" * 32}}
    with pytest.raises(FetchError, match=f"{zips['gtFine']} has MD5 {md5['gtFine']}, expected 0{{32}}"):
        prepare(wrong, tmp_path / "data")


def test_cityscapes_without_zips_says_it_needs_a_login(tmp_path, capsys):
    cfg = data_config(["data=cityscapes", f"paths.data_dir={tmp_path / 'data'}"])
    with pytest.raises(FetchError) as err:
        prepare(cfg, tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message and "needs a login" in message and "leftImg8bit_trainvaltest.zip" in message
    assert "data.zips.leftImg8bit" in message
    # the published MD5s are checked by default: the test's zips are refused, naming the file and both MD5s
    zips = cityscapes_zips(tmp_path)
    cfg = {**cfg, "zips": {k: str(p) for k, p in zips.items()}}
    with pytest.raises(FetchError, match="expected 0a6e97e94b616a514066c9e2adb0c97f"):
        prepare(cfg, tmp_path / "data")
    # data.md5.*=null: the zips are hashed and the MD5 printed, to pin
    prepare({**cfg, "md5": {"leftImg8bit": None, "gtFine": None}}, tmp_path / "data")
    assert f"data.md5.gtFine={hashlib.md5(zips['gtFine'].read_bytes()).hexdigest()}" in capsys.readouterr().err


@pytest.mark.parametrize("packed", ["folder", "zip", "tar.gz"])
def test_own_folder_or_archive_is_prepared_with_the_split_recorded(tmp_path, packed):
    data = write_folder_dataset(tmp_path / "own_data", split_files=False, num_train=6, num_val=2)
    source = data.root
    if packed == "zip":
        source = tmp_path / "own_data.zip"
        source.write_bytes(zip_tree(data.root, "own_data"))
    elif packed == "tar.gz":
        import tarfile

        source = tmp_path / "own_data.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            tar.add(data.root, arcname=".")
    cfg = data_config([*data.overrides, f"data.input={source}", f"data.root={tmp_path / 'data' / 'own'}"])
    root = prepare(cfg, tmp_path / "data")
    assert root == tmp_path / "data" / "own"
    train, val = ((root / "splits" / f"{s}.txt").read_text().split() for s in ("train", "val"))
    assert sorted(train + val) == data.splits["all"] and len(val) == 2
    dataset = open_split(cfg, "val")
    assert dataset.ids == val
    np.testing.assert_array_equal(dataset[0][1], data.labels[val[0]])
    if packed == "folder":  # hard links: no second copy of the user's images, and their folder is untouched
        image = root / "images" / f"{val[0]}.jpg"
        assert os.path.samefile(image, data.images[val[0]])
        assert not (data.root / "splits").exists()


def test_own_input_that_is_no_layout_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    cfg = data_config(["data=folder", "data.class_names=[a,b]", f"data.input={tmp_path / 'notes.txt'}",
                       f"data.root={tmp_path / 'own'}"])
    with pytest.raises(ConfigError, match="neither a folder nor an archive"):
        prepare(cfg, tmp_path)


def test_pipeline_prepare_with_overrides_prepares_outside_dvc(tmp_path, capsys):
    """`python -m fcnseg.pipeline prepare data=folder data.input=… 'data.class_names=[…]'`: the config composed from
    conf/ with the overrides (no params.yaml needed); a bad input ends in one `error:` line."""
    from fcnseg.pipeline import main

    data = write_folder_dataset(tmp_path / "own_data", split_files=False)
    main(["prepare", "data=folder", f"data.input={data.root}", "data.class_names=[background,road,car]",
          f"paths.data_dir={tmp_path / 'data'}"])
    assert (tmp_path / "data" / "own" / "splits" / "val.txt").is_file()
    with pytest.raises(SystemExit):
        main(["prepare", "data=folder", f"data.input={tmp_path / 'missing'}", "data.class_names=[a,b]",
              f"paths.data_dir={tmp_path / 'data'}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.input=" in errors[0] and "neither a folder nor an archive" in errors[0]


def test_own_copy_of_a_known_layout_is_prepared_from_its_archive(tmp_path):
    """data.source=folder with data.layout=cityscapes: a Cityscapes folder you track with `dvc add` (here as a zip)
    is prepared from data.input and read with the Cityscapes label map; the wrong layout is one line."""
    data = write_cityscapes_dataset(tmp_path / "my_cityscapes", num_train=1, num_val=1)
    archive = tmp_path / "my_cityscapes.zip"
    archive.write_bytes(zip_tree(data.root, "my_cityscapes"))
    cfg = data_config(["data=cityscapes", "data.source=folder", f"data.input={archive}",
                       f"data.root={tmp_path / 'data' / 'cityscapes'}"])
    root = prepare(cfg, tmp_path / "data")
    assert (root / "gtFine").is_dir() and (root / ".complete").is_file()
    np.testing.assert_array_equal(open_split(cfg, "val")[0][1], data.labels[data.splits["val"][0]])
    with pytest.raises(ConfigError, match="has no images/: it is not in the ade20k layout"):
        prepare({**cfg, "layout": "ade20k", "input": str(data.root)}, tmp_path / "data")


def test_fcnseg_fetch_ade20k_from_a_mirror(server, ade_zip, tmp_path, monkeypatch, capsys):
    """`fcnseg fetch --dataset ade20k --mirror URL`: the same fetcher; the test's zip stands in for the real one (its
    MD5 replaces the pinned one, which a wrong archive given with --tarball is checked against)."""
    from fcnseg import cli
    from fcnseg.data import prepare as prepare_module
    from fcnseg.data.fetch import ADE20K, Resource

    wrong = tmp_path / "ADEChallengeData2016.zip"
    wrong.write_bytes(b"not the zip")
    with pytest.raises(SystemExit):
        cli.main(["fetch", "--dataset", "ade20k", "--data-dir", str(tmp_path / "data"), "--tarball", str(wrong)])
    assert "expected 7328b3957e407ddae1d3cbf487f149ef" in capsys.readouterr().err
    monkeypatch.setattr(prepare_module, "ADE20K", Resource(ADE20K.filename, hashlib.md5(ade_zip).hexdigest(), None,
                                                           ADE20K.urls))
    cli.main(["fetch", "--dataset", "ade20k", "--data-dir", str(tmp_path / "data"), "--mirror", closed_port_url(),
              "--mirror", server.url("/ADEChallengeData2016.zip")])
    assert "ADE20K ready at" in capsys.readouterr().out
    assert (tmp_path / "data" / "ADEChallengeData2016" / "images" / "training").is_dir()


def test_data_version_of_own_data_without_dvc_tells_folders_apart(tmp_path, monkeypatch):
    """A folder used in place (no .dvc file, no marker): its version follows its files and split lists; two
    different folders never share one. A `dvc add`-tracked data.root gives its DVC hash."""
    from fcnseg import lineage

    monkeypatch.chdir(tmp_path)  # no dvc.lock here
    first = write_folder_dataset(tmp_path / "first").root
    second = write_folder_dataset(tmp_path / "second", num_train=3).root
    version = lineage.data_version(first)
    assert version != lineage.data_version(second) and version == lineage.data_version(first)
    (first / "splits" / "val.txt").write_text("scene_005\n")
    assert lineage.data_version(first) != version
    (tmp_path / "second.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: second\n")
    assert lineage.data_version(second) == "0123456789abcdef0123456789abcdef.dir"
