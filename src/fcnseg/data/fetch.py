"""Getting dataset archives: download with mirrors, resume and checksums; safe, atomic extraction.

A download goes to ``<dest>/<filename>.part`` and becomes ``<dest>/<filename>`` only once its size and MD5
match, so a file under its final name is always the right one. An interrupted transfer keeps its ``.part`` and
the next call resumes it with an HTTP Range request. Extraction (tar archives and zips) happens in a temporary
directory next to the target, which is renamed into place in one step: a half-extracted archive never sits under
the target's name.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fcnseg.errors import FetchError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """A file pinned by name, MD5 (and size when known), with the URLs it can be had from, tried in order."""

    filename: str
    md5: str
    size: int | None
    urls: tuple[str, ...]


VOC2012_TRAINVAL = Resource(
    filename="VOCtrainval_11-May-2012.tar",
    md5="6cd6e144f989b92b3379bac3b3de84fd",
    size=1_999_639_040,
    urls=(
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        "http://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        # The mirror the darknet/YOLO instructions use; the MD5 check refuses it if it ever serves anything else.
        "https://pjreddie.com/media/files/VOCtrainval_11-May-2012.tar",
    ),
)

SBD = Resource(
    filename="benchmark.tgz",
    md5="82b4d87ceb2ed10f6038a1cba92111cb",
    size=None,
    urls=(
        "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
        "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
    ),
)

# ADE20K (MIT SceneParsing): images/ + annotations/ {training,validation}, 150 classes; public, no login.
ADE20K = Resource(
    filename="ADEChallengeData2016.zip",
    md5="7328b3957e407ddae1d3cbf487f149ef",
    size=None,
    urls=("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",),
)
# Cityscapes needs a login: only the user's own copies of these zips are used (their MD5 checked when configured).
CITYSCAPES_ZIPS = {"leftImg8bit": "leftImg8bit_trainvaltest.zip", "gtFine": "gtFine_trainvaltest.zip"}

ADE20K_WAYS_OUT = (
    "pass a local copy (`data.archive=PATH`, verified by MD5), list other URLs in data.mirrors, "
    "or run offline on synthetic data (`experiment=quickstart`)"
)
VOC_WAYS_OUT = (
    "pass a local copy (`fcnseg fetch --tarball PATH` or `data.tarball=PATH`), "
    "`dvc pull data.dvc` from a DVC remote, or run offline on synthetic data (`experiment=quickstart`)"
)
SBD_WAYS_OUT = (
    "pass a local copy (`fcnseg fetch --sbd --sbd-tarball PATH` or `data.sbd_tarball=PATH`), "
    "train without SBD (`data=voc`), or run offline on synthetic data (`experiment=quickstart`)"
)


def md5sum(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def mismatch(path: str | Path, resource: Resource) -> str | None:
    """Why ``path`` is not ``resource`` (size checked first: it is free), or None when it is."""
    path = Path(path)
    if not path.is_file():
        return f"{path} does not exist"
    size = path.stat().st_size
    if resource.size is not None and size != resource.size:
        return f"{path} has {size:,} bytes, expected {resource.size:,}"
    digest = md5sum(path)
    if digest != resource.md5:
        return f"{path} has MD5 {digest}, expected {resource.md5}"
    return None


def verify(path: str | Path, resource: Resource) -> Path:
    """Returns ``path`` if it is ``resource`` (size and MD5), else raises FetchError naming the file."""
    problem = mismatch(path, resource)
    if problem:
        raise FetchError(f"{problem}: not a valid {resource.filename}; delete it or give the right file")
    return Path(path)


def use_local_tarball(path: str | Path, resource: Resource, dest_dir: str | Path) -> Path:
    """Verifies a tarball the user already has and puts it at ``<dest_dir>/<filename>`` (hard link, else copy)."""
    source = verify(path, resource)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / resource.filename
    if target.exists() and os.path.samefile(source, target):
        return target
    for stale in dest_dir.glob(f"{resource.filename}.tmp-*"):
        stale.unlink(missing_ok=True)
    temp = dest_dir / f"{resource.filename}.tmp-{os.getpid()}"
    try:
        try:
            os.link(source, temp)  # free on the same filesystem, and DVC's cache may link it again
        except OSError:
            shutil.copyfile(source, temp)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


class _Interrupted(Exception):
    """A transfer that delivered bytes and then stopped: worth resuming from the same URL."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, socket.gaierror):
        return "host not found"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return "timed out"
    text = str(reason).replace("\n", " ").strip() or type(reason).__name__
    return text[:80]


def _transfer(url: str, part: Path, resource: Resource, timeout: float, progress: bool) -> None:
    """One request: appends to ``part`` from its current size (Range), or rewrites it when the server ignores Range."""
    offset = part.stat().st_size if part.exists() else 0
    if resource.size is not None and offset >= resource.size:
        if offset == resource.size:
            return  # all bytes are here; the checksum decides
        part.unlink()
        offset = 0
    headers = {"User-Agent": "fcnseg"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing after offset: the .part is already whole (size unknown)
            return
        raise
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored Range and sends the whole file: start over
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        total = resource.size or (offset + expected if expected is not None else None)
        received = 0
        with open(part, "ab" if offset else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=resource.filename, disable=not progress, leave=False,
        ) as bar:
            try:
                # read1: whatever has arrived, so an interrupted transfer keeps what it got (flushed for SIGKILL)
                while chunk := response.read1(CHUNK):
                    out.write(chunk)
                    out.flush()
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise (_Interrupted(_describe(exc)) if received else exc) from exc
        if expected is not None and received < expected:
            # http.client ends a short body silently: the connection was cut.
            raise _Interrupted(f"connection closed after {received:,} of {expected:,} bytes")


def download(resource: Resource, dest_dir: str | Path, *, timeout: float = 10, retries_per_url: int = 2,
             progress: bool = True, ways_out: str = VOC_WAYS_OUT) -> Path:
    """Returns ``<dest_dir>/<filename>``, verified; downloads it (mirrors in order, resuming a ``.part``) if needed.

    ``retries_per_url`` is how many times a URL is tried again after a transfer that stopped midway (each retry
    resumes); a URL that cannot be reached or answers with an error is left for the next one at once, so being
    offline fails within seconds. ``ways_out`` ends the error message when every URL failed.
    """
    dest_dir = Path(dest_dir)
    final = dest_dir / resource.filename
    if final.is_file() and mismatch(final, resource) is None:
        return final
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest_dir / f"{resource.filename}.part"
    failures: list[str] = []
    for url in resource.urls:
        for attempt in range(retries_per_url + 1):
            try:
                _transfer(url, part, resource, timeout, progress)
            except _Interrupted as exc:
                if attempt < retries_per_url:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                failures.append(f"{url} ({exc})")
                break
            except (OSError, http.client.HTTPException) as exc:  # URLError/HTTPError are OSErrors
                failures.append(f"{url} ({_describe(exc)})")
                break
            problem = mismatch(part, resource)
            if problem is None:
                os.replace(part, final)
                return final
            part.unlink(missing_ok=True)
            raise FetchError(f"download of {resource.filename} from {url} is corrupt ({problem}); deleted it: "
                             f"run again, or {ways_out}")
    kept = f"; {part.stat().st_size:,} bytes kept in {part} for resuming" if part.exists() else ""
    raise FetchError(f"could not download {resource.filename}: tried {', '.join(failures)}{kept}; "
                     f"to go on, {ways_out}")


def _strict_data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, but refusing absolute names outright (it would silently make them relative)."""
    if member.name.startswith(("/", "\\")) or os.path.isabs(member.name):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def _checked_members(tar: tarfile.TarFile, dest: Path) -> Iterator[tarfile.TarInfo]:
    """Fallback for Pythons without extraction filters (< 3.11.4): refuse anything that is not plainly inside."""
    root = dest.resolve()
    for member in tar:
        target = (root / member.name).resolve()
        if os.path.isabs(member.name) or not target.is_relative_to(root):
            raise FetchError(f"{tar.name}: member {member.name!r} would be written outside {dest}; refused")
        if member.issym() or member.islnk():
            base = target.parent if member.issym() else root
            if os.path.isabs(member.linkname) or not (base / member.linkname).resolve().is_relative_to(root):
                raise FetchError(f"{tar.name}: link {member.name!r} points outside {dest}; refused")
        elif not (member.isfile() or member.isdir()):
            raise FetchError(f"{tar.name}: member {member.name!r} is a device or pipe; refused")
        yield member


def _extract_zip(archive: Path, staging: Path) -> None:
    """Extracts a zip into ``staging``, refusing members that would land outside it (absolute names, ``..``,
    drive letters) and symbolic links, before anything is written."""
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for member in members:
            name = member.filename
            parts = name.replace("\\", "/").split("/")
            if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or ":" in parts[0]:
                raise FetchError(f"{archive}: member {name!r} is unsafe (outside the extraction directory); refused, "
                                 "nothing extracted")
            if stat.S_ISLNK(member.external_attr >> 16):
                raise FetchError(f"{archive}: member {name!r} is unsafe (a symbolic link); refused, nothing "
                                 "extracted")
        for member in members:
            zf.extract(member, staging)


def _with_progress(members: Iterator[tarfile.TarInfo], label: str, progress: bool) -> Iterator[tarfile.TarInfo]:
    with tqdm(desc=f"extracting {label}", unit=" files", disable=not progress, leave=False) as bar:
        for member in members:
            yield member
            bar.update()


def _extract_tar(archive: Path, staging: Path, progress: bool) -> None:
    with tarfile.open(archive) as tar:
        tar.errorlevel = 2  # every extraction problem raises instead of being skipped
        if hasattr(tarfile, "data_filter"):
            tar.extractall(staging, members=_with_progress(iter(tar), archive.name, progress),
                           filter=_strict_data_filter)
        else:
            members = _with_progress(_checked_members(tar, staging), archive.name, progress)
            tar.extractall(staging, members=members)


def safe_extract(archive: str | Path, target_dir: str | Path, *, subdir: str | None = None,
                 progress: bool = False) -> Path:
    """Extracts ``archive`` (a tar archive, compressed or not, or a zip; its ``subdir`` only, if given) so that it
    appears at ``target_dir`` in one rename.

    Members that would land outside the extraction directory (``../x``, absolute names, links pointing out),
    device files and pipes are refused with FetchError, and nothing is left behind: neither the temporary
    directory nor the target. The target must not exist yet.
    """
    archive, target = Path(archive), Path(target_dir)
    if target.exists():
        raise FetchError(f"{target} already exists; remove it to extract {archive.name} again")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, staging)
        else:
            _extract_tar(archive, staging, progress)
        extracted = staging / subdir if subdir else staging
        if not extracted.is_dir():
            raise FetchError(f"{archive} has no {subdir}/ directory; is it the right archive?")
        os.rename(extracted, target)
    except tarfile.FilterError as exc:
        raise FetchError(f"{archive}: member {exc.tarinfo.name!r} is unsafe ({exc}); refused, nothing extracted") \
            from exc
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise FetchError(f"{archive} is not a readable archive ({exc}); delete it and fetch it again") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
