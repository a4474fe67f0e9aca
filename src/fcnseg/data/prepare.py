"""The ``prepare`` stage: put a dataset in its layout (VOC, folder, Cityscapes, ADE20K), ready for its reader.

A dataset directory counts as ready only when its ``.complete`` marker exists. The marker is written last, after
the archive was extracted elsewhere and renamed into place, so a prepare killed at any moment (even SIGKILL)
leaves nothing that looks ready; the next run removes the leftovers (``*.tmp-*``, unmarked directories) and
finishes the job. Concurrent prepares of one ``data_dir`` wait for each other (a file lock).

Layout under ``data_dir``::

    downloads/VOCtrainval_11-May-2012.tar     (where data.dvc puts it)    downloads/benchmark.tgz
    VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets,...,.complete}
    SBD/benchmark_RELEASE/dataset/{cls,img,inst,train.txt,val.txt,.complete}
    ADEChallengeData2016/{images,annotations,.complete}          (data=ade20k: downloaded or data.archive)
    cityscapes/{leftImg8bit,gtFine,.complete}                     (data=cityscapes: the user's zips, data.zips)

Own data (data=folder) is built at ``data.root`` from ``data.input``, the folder or archive the user tracks with
``dvc add``: a folder as hard links to its files, an archive extracted safely; the split lists are written into it
when the data has none (the deterministic split by ``data.folder.val_fraction`` and ``split_seed``, recorded), and
its marker records the input's DVC hash. ``data.input=null`` uses ``data.root`` as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from filelock import FileLock

from fcnseg.data import pin
from fcnseg.data.fetch import (ADE20K, ADE20K_WAYS_OUT, CITYSCAPES_ZIPS, SBD, SBD_WAYS_OUT, VOC_WAYS_OUT, Resource,
                               download, md5sum, safe_extract, use_local_tarball, verify)
from fcnseg.data.folder import find_pairs, folder_options, write_split_lists
from fcnseg.data.synthetic import write_synthetic_voc
from fcnseg.data.voc import COMPLETE_MARKER
from fcnseg.errors import ConfigError, FetchError

SOURCES = ("voc", "synthetic", "folder", "ade20k", "cityscapes")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
CITYSCAPES_HINT = ("Cityscapes needs a login, so fcnseg cannot download it: log in at "
                   "https://www.cityscapes-dataset.com/downloads/, download leftImg8bit_trainvaltest.zip and "
                   "gtFine_trainvaltest.zip and set data.zips.leftImg8bit / data.zips.gtFine to them")
CACHE_ENV = "FCNSEG_EXTRACTED_CACHE"
VOC_DIRS = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")


def voc_root(data_dir: str | Path) -> Path:
    return Path(data_dir) / "VOCdevkit" / "VOC2012"


def sbd_root(data_dir: str | Path) -> Path:
    return Path(data_dir) / "SBD" / "benchmark_RELEASE" / "dataset"


def is_complete(root: str | Path) -> bool:
    return (Path(root) / COMPLETE_MARKER).is_file()


def _remove(path: Path) -> None:
    """Removes a leftover: renamed aside first (atomic) so a kill mid-delete still leaves only a ``*.tmp-*``."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    aside = path.with_name(f"{path.name}.tmp-stale-{os.getpid()}")
    os.replace(path, aside)
    shutil.rmtree(aside)


def _write_marker(root: Path, resource: Resource) -> None:
    temp = root / f"{COMPLETE_MARKER}.tmp-{os.getpid()}"
    temp.write_text(json.dumps({"archive": resource.filename, "md5": resource.md5}) + "\n")
    os.replace(temp, root / COMPLETE_MARKER)


def _extracted_from(root: Path) -> str | None:
    """The MD5 of the archive a complete ``root`` was extracted from; None when ``root`` is not complete."""
    try:
        return json.loads((root / COMPLETE_MARKER).read_text()).get("md5")
    except (OSError, ValueError, AttributeError):
        return None


def extracted_cache(resource: Resource, subdir: str) -> Path | None:
    """Where this machine keeps ``subdir`` of the archive extracted once, keyed by the archive's MD5, outside every
    workspace: ``$FCNSEG_EXTRACTED_CACHE`` (``off``: no cache), else ``~/.cache/fcnseg/extracted``."""
    base = os.environ.get(CACHE_ENV, str(Path.home() / ".cache" / "fcnseg" / "extracted"))
    return None if base in ("", "off") else Path(base) / resource.md5 / Path(subdir).name


def _link_tree(source: Path, target: Path) -> None:
    """``target`` as a tree of hard links to ``source``'s files (a copy where linking fails), renamed into place."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem
            shutil.copy2(src, dst)

    staging = target.with_name(f"{target.name}.tmp-link-{os.getpid()}")
    shutil.copytree(source, staging, copy_function=link, symlinks=True)
    os.replace(staging, target)


def _extract_once(root: Path, resource: Resource, subdir: str, data_dir: Path, local: str | Path | None,
                  ways_out: str, progress: bool) -> Path:
    """``root`` from ``subdir`` of the archive. Extracted once per machine into :func:`extracted_cache` (from a
    local copy if given, else downloaded or already downloaded), then linked into ``root``: the workspace and every
    ``--temp``/``--queue`` experiment share one extraction and its disk space. A ``root`` extracted from another
    archive (a new pin) is replaced."""
    if _extracted_from(root) == resource.md5:
        return root
    cache = extracted_cache(resource, subdir)
    if cache is None:
        return _extract(root, resource, subdir, data_dir, local, ways_out, progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(cache.parent / ".extract.lock"):  # queue workers of one machine share it
        if _extracted_from(cache) != resource.md5:
            _extract(cache, resource, subdir, data_dir, local, ways_out, progress)
    for leftover in root.parent.glob(f"{root.name}.tmp-*"):
        _remove(leftover)
    if root.exists() or root.is_symlink():
        _remove(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"linking {root} to the extraction in {cache}", file=sys.stderr, flush=True)
    _link_tree(cache, root)
    return root


def _extract(root: Path, resource: Resource, subdir: str, data_dir: Path, local: str | Path | None,
             ways_out: str, progress: bool) -> Path:
    downloads = data_dir / "downloads"
    if local is not None:
        archive = use_local_tarball(local, resource, downloads)
    else:  # returns the DVC-tracked/earlier download at once when it verifies
        archive = download(resource, downloads, progress=progress, ways_out=ways_out)
    for leftover in root.parent.glob(f"{root.name}.tmp-*"):  # killed runs' temp dirs (the lock: none is running)
        _remove(leftover)
    if root.exists() or root.is_symlink():
        _remove(root)  # there but unmarked (an interrupted run, a foreign copy) or from another archive
    if progress:
        print(f"extracting {archive} into {root}", file=sys.stderr, flush=True)
    safe_extract(archive, root, subdir=subdir, progress=progress)
    _write_marker(root, resource)
    return root


def prepare_voc(data_dir: str | Path, tarball: str | Path | None = None, sbd: bool = False,
                sbd_tarball: str | Path | None = None, *, progress: bool = True,
                voc_resource: Resource | None = None, sbd_resource: Resource | None = None) -> Path:
    """Makes ``<data_dir>/VOCdevkit/VOC2012`` (and with ``sbd``, ``<data_dir>/SBD/benchmark_RELEASE/dataset``)
    ready, and returns the VOC root. Archives: the given local copies (verified), else the ones already in
    ``<data_dir>/downloads`` or where ``dvc pull`` puts data.dvc's (verified), else downloaded.

    ``voc_resource`` defaults to the tarball ``data.dvc`` pins (run from the project root), fetched from
    ``$FCNSEG_VOC_MIRRORS`` or the pin's URL and the known mirrors. The pinned tarball, once here, is stored in
    DVC's cache, so ``dvc push`` sends it to the team's remote."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    resource = voc_resource or pin.voc_resource()
    pinned, tracked = pin.pinned()
    is_pinned = tracked is not None and pinned.md5 == resource.md5
    if is_pinned and tarball is None:
        # there by `dvc pull` or an earlier fetch, or in DVC's cache only (a `dvc exp run --temp` workspace, a
        # deleted data/): verified, never downloaded again
        tarball = tracked if tracked.is_file() else pin.cached_tarball(resource)
    with FileLock(data_dir / ".prepare.lock"):
        root = _extract_once(voc_root(data_dir), resource, "VOCdevkit/VOC2012", data_dir, tarball, VOC_WAYS_OUT,
                             progress)
        if is_pinned:
            pin.add_to_dvc_cache(data_dir / "downloads" / resource.filename, resource)
    if sbd or sbd_tarball is not None:
        prepare_sbd(data_dir, sbd_tarball, progress=progress, resource=sbd_resource)
    return root


def prepare_sbd(data_dir: str | Path, sbd_tarball: str | Path | None = None, *, progress: bool = True,
                resource: Resource | None = None) -> Path:
    """Makes ``<data_dir>/SBD/benchmark_RELEASE/dataset`` (SBD's cls/, img/, train.txt, val.txt) ready; returns it."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(data_dir / ".prepare.lock"):
        return _extract_once(sbd_root(data_dir), resource or SBD, "benchmark_RELEASE/dataset", data_dir, sbd_tarball,
                             SBD_WAYS_OUT, progress)


def _looks_like_voc(root: Path) -> bool:
    return all((root / name).is_dir() for name in VOC_DIRS)


def _dvc_hash(path: Path) -> str | None:
    """The hash ``dvc add`` recorded for ``path`` in ``<path>.dvc``, or None."""
    tracked = pin.dvc_tracked(path)
    return tracked[1] if tracked else None


def _top_dir(layout: str, options: dict) -> str:
    """The directory a dataset of ``layout`` has at its top (how the dataset is found in an archive)."""
    return {"voc": "JPEGImages", "cityscapes": "leftImg8bit", "ade20k": "images"}.get(layout, options["images"])


def _folder_root_of(extracted: Path, top: str) -> Path:
    """The dataset directory in an extracted archive (it holds ``top``): the archive's top, or its one top folder."""
    if (extracted / top).is_dir():
        return extracted
    children = [child for child in extracted.iterdir() if child.is_dir() and not child.name.startswith((".", "__"))]
    if len(children) == 1 and (children[0] / top).is_dir():
        return children[0]
    raise ConfigError(f"the archive holds no {top}/ (at its top or in one top folder); pack the dataset's directory "
                      "(data.layout says which layout it is in)")


def prepare_folder(data_cfg: dict, *, progress: bool = True) -> Path:
    """Own data at ``data.root``: built from ``data.input`` (a folder: hard links; an archive: extracted safely),
    or ``data.root`` as it is without ``data.input``. In the folder layout, split lists are written when the data has
    none; data in another layout (``data.layout``: voc, cityscapes, ade20k) is taken as it is."""
    root, options = Path(data_cfg["root"]), folder_options(data_cfg.get("folder"))
    layout = str(data_cfg.get("layout") or "folder")
    source = data_cfg.get("input")
    if not source or Path(source).resolve() == root.resolve():
        if layout == "folder":
            find_pairs(root, options)  # one line now if the folder is not the layout, not at training time
        return root
    source = Path(source)
    is_archive = source.is_file() and source.name.lower().endswith(ARCHIVE_SUFFIXES)
    if not (source.is_dir() or is_archive):
        raise ConfigError(f"data.input={source} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)}); "
                          "point it at the folder of images/ + masks/ you track with `dvc add`, or set data.input=null "
                          "and data.root to the folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}.prepare.lock"):
        for leftover in root.parent.glob(f"{root.name}.tmp-*"):
            _remove(leftover)
        staging = root.with_name(f"{root.name}.tmp-build-{os.getpid()}")
        if is_archive:
            extracted = safe_extract(source, root.with_name(f"{root.name}.tmp-extract-{os.getpid()}"),
                                     progress=progress)
            os.replace(_folder_root_of(extracted, _top_dir(layout, options)), staging)
            if extracted.exists():
                _remove(extracted)
        else:
            _link_tree(source, staging)
        if layout == "folder":
            find_pairs(staging, options)
            write_split_lists(staging, options)  # the ratio split, recorded in the data (and so in its DVC hash)
        elif not (staging / _top_dir(layout, options)).is_dir():
            raise ConfigError(f"data.input={source} has no {_top_dir(layout, options)}/: it is not in the "
                              f"{layout} layout (data.layout)")
        temp = staging / f"{COMPLETE_MARKER}.tmp-{os.getpid()}"
        temp.write_text(json.dumps({"input": str(source), "dvc_md5": _dvc_hash(source)}) + "\n")
        os.replace(temp, staging / COMPLETE_MARKER)
        if root.exists() or root.is_symlink():
            _remove(root)
        os.replace(staging, root)
    if progress:
        print(f"prepared {root} from {source}", file=sys.stderr, flush=True)
    return root


def prepare_ade20k(data_cfg: dict, data_dir: str | Path, *, progress: bool = True) -> Path:
    """``data.root`` (``ADEChallengeData2016``) from the public zip (``data.mirrors`` or its URL; resumed, MD5
    ``data.md5`` checked) or a local copy (``data.archive``, verified)."""
    mirrors = data_cfg.get("mirrors")
    urls = tuple(mirrors.split() if isinstance(mirrors, str) else mirrors or ADE20K.urls)
    resource = Resource(ADE20K.filename, str(data_cfg.get("md5") or ADE20K.md5), None, urls)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(data_dir / ".prepare.lock"):
        return _extract_once(Path(data_cfg["root"]), resource, "ADEChallengeData2016", data_dir,
                             data_cfg.get("archive"), ADE20K_WAYS_OUT, progress)


def prepare_cityscapes(data_cfg: dict, data_dir: str | Path, *, progress: bool = True) -> Path:
    """``data.root`` from the user's Cityscapes zips (``data.zips``), each checked against ``data.md5`` when set
    (else its MD5 is printed, to pin it); both extracted safely, their MD5s recorded in the marker."""
    root = Path(data_cfg["root"])
    zips, md5s = dict(data_cfg.get("zips") or {}), dict(data_cfg.get("md5") or {})
    archives = {}
    for key, filename in CITYSCAPES_ZIPS.items():
        path = Path(str(zips.get(key) or ""))
        if not zips.get(key) or not path.is_file():
            raise FetchError(f"Cityscapes zip {filename} not found at data.zips.{key}={zips.get(key)}; "
                             f"{CITYSCAPES_HINT}")
        if md5s.get(key):
            verify(path, Resource(filename, str(md5s[key]), None, ()))
            digest = str(md5s[key])
        else:
            digest = md5sum(path)
            print(f"{path}: MD5 {digest} (set data.md5.{key}={digest} to check it on every prepare)",
                  file=sys.stderr, flush=True)
        archives[key] = (path, digest)
    record = {key: digest for key, (_, digest) in archives.items()}
    try:
        if json.loads((root / COMPLETE_MARKER).read_text()).get("md5") == record:
            return root  # extracted from these zips already
    except (OSError, ValueError, AttributeError):
        pass
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}.prepare.lock"):
        for leftover in root.parent.glob(f"{root.name}.tmp-*"):
            _remove(leftover)
        staging = root.with_name(f"{root.name}.tmp-build-{os.getpid()}")
        staging.mkdir()
        for key, (path, _) in archives.items():
            if progress:
                print(f"extracting {path} into {root}", file=sys.stderr, flush=True)
            safe_extract(path, staging / key, subdir=key, progress=progress)
        (staging / COMPLETE_MARKER).write_text(json.dumps({"archive": list(CITYSCAPES_ZIPS.values()),
                                                           "md5": record}) + "\n")
        if root.exists() or root.is_symlink():
            _remove(root)
        os.replace(staging, root)
    return root


def prepare(data_cfg: dict, data_dir: str | Path, *, voc_resource: Resource | None = None) -> Path:
    """The pipeline's prepare stage for the ``data`` config group; returns the dataset root (``data.root``).
    ``voc_resource``: the VOC tarball and its URLs (default: the package's pin and mirrors)."""
    source = data_cfg.get("source")
    if source == "synthetic":
        return write_synthetic_voc(data_cfg["root"], **(data_cfg.get("synthetic") or {}))
    if source == "folder":
        return prepare_folder(data_cfg)
    if source == "ade20k":
        return prepare_ade20k(data_cfg, data_dir)
    if source == "cityscapes":
        return prepare_cityscapes(data_cfg, data_dir)
    if source == "voc":
        resource = voc_resource or pin.voc_resource(mirrors=data_cfg.get("mirrors"))
        expected, pinned_md5 = data_cfg.get("pinned_md5"), pin.pinned()[0].md5
        if expected is not None and expected != pinned_md5:
            raise ConfigError(f"data.pinned_md5={expected} is not the MD5 {pin.PIN_FILE} pins ({pinned_md5}); set "
                              f"it to the pin's in conf/data/voc.yaml and recompose params.yaml "
                              f"(python -m fcnseg.pipeline params)")
        root = Path(data_cfg.get("root") or voc_root(data_dir))
        if root.resolve() != voc_root(data_dir).resolve():
            # data.root moved to a VOC2012 directory the user already has (e.g. a shared copy): use it as it is.
            if not _looks_like_voc(root):
                raise ConfigError(f"data.root={root} is not a VOC2012 directory (needs {', '.join(VOC_DIRS)}); "
                                  f"point it at one, or leave it at {voc_root(data_dir)} to fetch VOC there")
            if data_cfg.get("sbd") or data_cfg.get("sbd_tarball"):
                prepare_sbd(data_dir, data_cfg.get("sbd_tarball"))
            return root
        return prepare_voc(data_dir, tarball=data_cfg.get("tarball"), sbd=bool(data_cfg.get("sbd")),
                           sbd_tarball=data_cfg.get("sbd_tarball"), voc_resource=resource)
    raise ConfigError(f"data.source={source!r} is not known; valid sources: {', '.join(SOURCES)}")
