"""fcnseg.data.fetch against a real HTTP server on 127.0.0.1 (Range, 404, cut connections, Range ignored)."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.data.classes import voc_palette
from fcnseg.data.fetch import Resource, download, safe_extract, use_local_tarball, verify
from fcnseg.errors import FetchError
from tests.servers import free_port

# ---------------------------------------------------------------- helpers (test_prepare.py loads these too)

VOC_IDS = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}


def _png_bytes(array: np.ndarray, palette: bool) -> bytes:
    image = Image.fromarray(array, mode="P" if palette else None)
    if palette:
        image.putpalette(voc_palette().flatten().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_300_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def voc_tarball_bytes(prefix: str = "VOCdevkit/VOC2012", extra=None) -> bytes:
    """A few KB in the VOC layout: JPEGs, palette PNG labels (0, 1, 255), ImageSets/Segmentation/{train,val}.txt."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for split, ids in VOC_IDS.items():
            for image_id in ids:
                add_member(tar, f"{prefix}/JPEGImages/{image_id}.jpg",
                           _jpeg_bytes(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)))
                label = np.zeros((8, 8), np.uint8)
                label[2:6, 2:6], label[0] = 1, 255
                add_member(tar, f"{prefix}/SegmentationClass/{image_id}.png", _png_bytes(label, palette=True))
            add_member(tar, f"{prefix}/ImageSets/Segmentation/{split}.txt", "".join(f"{i}\n" for i in ids).encode())
        for args, fields in extra or ():
            add_member(tar, *args, **fields)
    return buffer.getvalue()


def resource_for(data: bytes, urls: list[str], filename: str = "VOCtrainval_11-May-2012.tar",
                 size: bool = True) -> Resource:
    return Resource(filename, hashlib.md5(data).hexdigest(), len(data) if size else None, tuple(urls))


def closed_port_url(name: str = "x.tar") -> str:
    return f"http://127.0.0.1:{free_port()}/{name}"  # nothing listens there: connection refused


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes). Knobs: ``not_found`` paths answer 404; ``cut_after`` bytes then close the
    connection (for the next ``cut_times`` responses); ``stall_after`` bytes then hang until ``release``;
    ``ignore_range`` answers 200 with the whole file. ``requests`` records (path, Range header)."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.not_found: set[str] = set()
        self.cut_after: int | None = None
        self.cut_times = 0
        self.stall_after: int | None = None
        self.stalled, self.release = threading.Event(), threading.Event()
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up (cut or killed) are part of the tests


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        range_header = self.headers.get("Range")
        srv.requests.append((self.path, range_header))
        data = srv.files.get(self.path)
        if data is None or self.path in srv.not_found:
            self.send_error(404)
            return
        start = 0
        if range_header and not srv.ignore_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.stall_after is not None:
            self.wfile.write(body[: srv.stall_after])
            self.wfile.flush()
            srv.stalled.set()
            srv.release.wait(30)
            return
        if srv.cut_after is not None and srv.cut_times > 0:
            srv.cut_times -= 1
            body = body[: srv.cut_after]
        self.wfile.write(body)


@pytest.fixture
def voc_bytes() -> bytes:
    return voc_tarball_bytes()


@pytest.fixture
def server(voc_bytes):
    srv = FileServer({"/voc.tar": voc_bytes, "/mirror2/voc.tar": voc_bytes})
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- download


@pytest.mark.parametrize("first_mirror", ["404", "closed port"])
def test_first_mirror_fails_second_succeeds(server, voc_bytes, tmp_path, first_mirror):
    server.not_found.add("/voc.tar")
    first = server.url("/voc.tar") if first_mirror == "404" else closed_port_url()
    resource = resource_for(voc_bytes, [first, server.url("/mirror2/voc.tar")])

    path = download(resource, tmp_path, progress=False)

    assert path == tmp_path / resource.filename
    assert _md5(path) == resource.md5
    assert not (tmp_path / f"{resource.filename}.part").exists()
    assert server.requests[-1][0] == "/mirror2/voc.tar"


def test_truncated_transfer_keeps_part_and_rerun_resumes_with_range(server, voc_bytes, tmp_path):
    resource = resource_for(voc_bytes, [server.url("/voc.tar")])
    server.cut_after, server.cut_times = 3000, 1

    with pytest.raises(FetchError, match="connection closed after 3,000"):
        download(resource, tmp_path, retries_per_url=0, progress=False)
    part = tmp_path / f"{resource.filename}.part"
    assert part.stat().st_size == 3000
    assert not (tmp_path / resource.filename).exists()

    path = download(resource, tmp_path, progress=False)

    assert server.requests[-1] == ("/voc.tar", "bytes=3000-")
    assert _md5(path) == resource.md5
    assert not part.exists()


def test_interrupted_transfer_is_resumed_within_one_call(server, voc_bytes, tmp_path):
    resource = resource_for(voc_bytes, [server.url("/voc.tar")])
    server.cut_after, server.cut_times = 5000, 1

    path = download(resource, tmp_path, retries_per_url=1, progress=False)

    assert [r[1] for r in server.requests] == [None, "bytes=5000-"]
    assert _md5(path) == resource.md5


def test_server_ignoring_range_restarts_from_zero(server, voc_bytes, tmp_path):
    resource = resource_for(voc_bytes, [server.url("/voc.tar")])
    part = tmp_path / f"{resource.filename}.part"
    part.write_bytes(b"\0" * 1000)  # would corrupt the file if the 200 answer were appended to it
    server.ignore_range = True

    path = download(resource, tmp_path, progress=False)

    assert server.requests == [("/voc.tar", "bytes=1000-")]
    assert _md5(path) == resource.md5


def test_complete_part_of_unknown_size_is_checked_not_refetched(server, voc_bytes, tmp_path):
    resource = resource_for(voc_bytes, [server.url("/voc.tar")], filename="benchmark.tgz", size=False)
    (tmp_path / "benchmark.tgz.part").write_bytes(voc_bytes)  # the server answers 416: nothing left to send

    path = download(resource, tmp_path, progress=False)

    assert _md5(path) == resource.md5


def test_wrong_md5_is_refused_and_nothing_left(server, voc_bytes, tmp_path):
    resource = Resource("VOCtrainval_11-May-2012.tar", "0" * 32, len(voc_bytes), (server.url("/voc.tar"),))

    with pytest.raises(FetchError, match="MD5") as info:
        download(resource, tmp_path, progress=False)

    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_offline_fails_in_one_line_naming_urls_and_ways_out(tmp_path):
    urls = [closed_port_url("a.tar"), closed_port_url("b.tar")]
    resource = Resource("VOCtrainval_11-May-2012.tar", "0" * 32, 10, tuple(urls))

    with pytest.raises(FetchError) as info:
        download(resource, tmp_path, progress=False)

    message = str(info.value)
    assert "\n" not in message
    for text in (*urls, "connection refused", "--tarball PATH", "data.tarball=PATH", "dvc pull",
                 "experiment=quickstart"):
        assert text in message


def test_verified_file_is_used_without_network(voc_bytes, tmp_path):
    resource = resource_for(voc_bytes, [closed_port_url()])
    (tmp_path / resource.filename).write_bytes(voc_bytes)

    assert download(resource, tmp_path, progress=False) == tmp_path / resource.filename


def test_corrupt_final_file_is_replaced_by_a_verified_download(server, voc_bytes, tmp_path):
    resource = resource_for(voc_bytes, [server.url("/voc.tar")])
    (tmp_path / resource.filename).write_bytes(b"x" * len(voc_bytes))

    path = download(resource, tmp_path, progress=False)

    assert _md5(path) == resource.md5


# ---------------------------------------------------------------- local tarball, verify


def test_local_tarball_is_verified_and_put_in_place(voc_bytes, tmp_path):
    local = tmp_path / "mine.tar"
    local.write_bytes(voc_bytes)
    resource = resource_for(voc_bytes, [closed_port_url()])

    placed = use_local_tarball(local, resource, tmp_path / "downloads")

    assert placed == tmp_path / "downloads" / resource.filename
    assert _md5(placed) == resource.md5
    assert local.read_bytes() == voc_bytes
    assert use_local_tarball(placed, resource, tmp_path / "downloads") == placed  # already in place


def test_wrong_local_tarball_is_refused_naming_the_file(voc_bytes, tmp_path):
    local = tmp_path / "other.tar"
    local.write_bytes(voc_bytes[:-1] + b"!")
    resource = resource_for(voc_bytes, [closed_port_url()])

    with pytest.raises(FetchError, match="other.tar has MD5"):
        use_local_tarball(local, resource, tmp_path / "downloads")
    with pytest.raises(FetchError, match="bytes, expected"):
        verify(local, Resource(resource.filename, resource.md5, 1, ()))
    assert not (tmp_path / "downloads" / resource.filename).exists()


# ---------------------------------------------------------------- extraction


def test_safe_extract_puts_subdir_at_target(voc_bytes, tmp_path):
    archive = tmp_path / "voc.tar"
    archive.write_bytes(voc_bytes)
    target = tmp_path / "out" / "VOC2012"

    assert safe_extract(archive, target, subdir="VOCdevkit/VOC2012") == target

    assert (target / "ImageSets/Segmentation/train.txt").read_text().split() == VOC_IDS["train"]
    label = np.array(Image.open(target / "SegmentationClass" / f"{VOC_IDS['val'][0]}.png"))
    assert set(np.unique(label)) == {0, 1, 255}
    assert sorted(p.name for p in target.parent.iterdir()) == ["VOC2012"]  # no temp dir left


@pytest.mark.parametrize("evil", [
    (("../evil", b"pwned"), {}),
    (("VOCdevkit/VOC2012/../../../evil", b"pwned"), {}),
    (("/tmp/evil-absolute", b"pwned"), {}),
    (("VOCdevkit/VOC2012/link",), {"type": tarfile.SYMTYPE, "linkname": "../../../evil"}),
    (("VOCdevkit/VOC2012/abslink",), {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-absolute"])
def test_unsafe_member_is_refused_and_nothing_left(tmp_path, evil):
    archive = tmp_path / "evil.tar"
    archive.write_bytes(voc_tarball_bytes(extra=[evil]))  # good members first: they must not stay either
    work = tmp_path / "work"
    target = work / "data" / "VOC2012"

    with pytest.raises(FetchError, match="unsafe"):
        safe_extract(archive, target, subdir="VOCdevkit/VOC2012")

    assert not target.exists()
    assert list((work / "data").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar", "work"]
    assert not Path("/tmp/evil-absolute").exists()


def test_archive_without_expected_subdir_is_refused(voc_bytes, tmp_path):
    archive = tmp_path / "voc.tar"
    archive.write_bytes(voc_bytes)

    with pytest.raises(FetchError, match="no benchmark_RELEASE/dataset/"):
        safe_extract(archive, tmp_path / "out" / "dataset", subdir="benchmark_RELEASE/dataset")
    assert list((tmp_path / "out").iterdir()) == []


def test_corrupt_archive_is_a_fetch_error(tmp_path):
    archive = tmp_path / "broken.tar"
    archive.write_bytes(b"not a tar file at all" * 100)

    with pytest.raises(FetchError, match="not a readable archive"):
        safe_extract(archive, tmp_path / "out" / "x")
    assert list((tmp_path / "out").iterdir()) == []
