"""``data.dvc``, the pin of the PASCAL VOC tarball: read as a :class:`Resource` (URL, MD5, size) with the mirror
list to fetch it from, and a fetched tarball stored in DVC's cache so that ``dvc push`` sends it to the remote.
Own data's pins are read here too: the ``.dvc`` file ``dvc add`` writes next to a folder or archive
(:func:`dvc_tracked`).

The pin is a frozen ``dvc import-url``: DVC never downloads it by itself (``dvc repro`` does not visit it, since no
stage depends on its output), ``dvc pull``/``dvc push`` move it. The ``prepare`` stage fetches it through
:mod:`fcnseg.data.fetch` (mirrors in order, resume, size + MD5) unless it is already there (``dvc pull``,
``fcnseg fetch --tarball``).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from fcnseg.data.fetch import VOC2012_TRAINVAL, Resource, mismatch
from fcnseg.errors import ConfigError

PIN_FILE = Path("data.dvc")
MIRRORS_ENV = "FCNSEG_VOC_MIRRORS"


def read_pin(pin_file: str | Path = PIN_FILE) -> tuple[Resource, Path]:
    """The pinned tarball (its one URL, MD5, size) and where DVC puts it (a path relative to the current dir)."""
    pin_file = Path(pin_file)
    try:
        pin = yaml.safe_load(pin_file.read_text())
        out, url = pin["outs"][0], pin["deps"][0]["path"]
        path = pin_file.parent / out["path"]
        return Resource(path.name, out["md5"], int(out["size"]), (url,)), path
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ConfigError(f"{pin_file} is not a readable DVC pin of the VOC tarball ({type(exc).__name__}: {exc}); "
                          f"restore it with `git checkout {pin_file}`") from exc


def mirror_urls(pinned: Resource, mirrors: list[str] | tuple[str, ...] | str | None = None) -> tuple[str, ...]:
    """The URLs to try, in order: ``$FCNSEG_VOC_MIRRORS`` (whitespace-separated) if set, else ``mirrors``
    (``data.mirrors``) if given, else the pin's URL followed by the known mirrors."""
    chosen: list[str] | tuple[str, ...] | str | None = os.environ.get(MIRRORS_ENV) or mirrors
    if isinstance(chosen, str):
        chosen = chosen.split()
    if chosen:
        return tuple(chosen)
    return tuple(dict.fromkeys([*pinned.urls, *VOC2012_TRAINVAL.urls]))


def pinned(pin_file: str | Path = PIN_FILE) -> tuple[Resource, Path | None]:
    """``data.dvc``'s tarball and where DVC puts it; outside a checkout (no pin file), the package's copy of the
    pin and None."""
    return read_pin(pin_file) if Path(pin_file).is_file() else (VOC2012_TRAINVAL, None)


def voc_resource(pin_file: str | Path = PIN_FILE, mirrors: list[str] | str | None = None) -> Resource:
    """The VOC tarball to fetch: MD5 and size from the pin (:func:`pinned`), URLs from :func:`mirror_urls`."""
    resource = pinned(pin_file)[0]
    return Resource(resource.filename, resource.md5, resource.size, mirror_urls(resource, mirrors))


def _dvc_cache(repo_root: str | Path):
    """The DVC project's local cache (an object DB) and the open Repo (to close); None outside a DVC project."""
    if not (Path(repo_root) / ".dvc").is_dir():
        return None
    from dvc.repo import Repo

    repo = Repo(str(repo_root))
    return repo.cache.local, repo


def cached_tarball(resource: Resource, repo_root: str | Path = ".") -> Path | None:
    """The file DVC's cache holds for ``resource`` (a temporary `dvc exp run` workspace, a deleted ``data/``), or
    None. Read it, never write it."""
    found = _dvc_cache(repo_root)
    if found is None:
        return None
    odb, repo = found
    try:
        path = Path(odb.oid_to_path(resource.md5))
        return path if path.is_file() else None
    finally:
        repo.close()


def add_to_dvc_cache(path: str | Path, resource: Resource, repo_root: str | Path = ".") -> bool:
    """Stores ``path`` (which must be ``resource``) in the DVC cache of ``repo_root``, as ``dvc commit`` would,
    so ``dvc push`` can send it. Returns False (and does nothing) outside a DVC project; verifies the file only
    when the cache does not hold it yet. Safe inside ``dvc repro``: it writes the cache, never DVC's lock."""
    found = _dvc_cache(repo_root) if Path(path).is_file() else None
    if found is None:
        return False
    odb, repo = found
    try:
        if odb.exists(resource.md5):
            return True
        problem = mismatch(path, resource)
        if problem:
            raise ConfigError(f"{problem}: not the tarball data.dvc pins; delete it and run again")
        # Our own download (one link) joins the cache as a hard link, as DVC's cache.type=hardlink would: no second
        # 2 GB copy (both names turn read-only). A file that is also the user's copy (`fcnseg fetch --tarball`
        # links it) is copied instead, so the user's file is never made read-only.
        odb.add(str(Path(path).resolve()), odb.fs, resource.md5, hardlink=os.stat(path).st_nlink == 1)
        odb.protect(odb.oid_to_path(resource.md5))
        return True
    finally:
        repo.close()


def dvc_tracked(path: str | Path) -> tuple[Path, str] | None:
    """The ``.dvc`` file that tracks ``path`` (``dvc add PATH`` writes ``PATH.dvc``) and the hash DVC records in it
    (a directory's ends in ``.dir``); None when ``path`` is not tracked that way."""
    dvc_file = Path(f"{Path(path)}.dvc")
    if not dvc_file.is_file():
        return None
    try:
        out = (yaml.safe_load(dvc_file.read_text()) or {})["outs"][0]
        digest = out.get("md5") or out.get("etag") or out.get("checksum")
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return (dvc_file, str(digest)) if digest else None
