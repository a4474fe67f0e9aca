"""``fcnseg import-weights``: a wkentaro/pytorch-fcn state dict becomes an fcnseg checkpoint (and registered model)
that predicts exactly what the same weights predict in Python with Caffe normalisation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.data.classes import VOC_CLASSES
from fcnseg.inference import Segmenter
from fcnseg.models import build_fcn
from tests.test_inference import (TINY_NET, noise_image, randomise_scores, single_thread,  # noqa: F401
                                  single_thread_env, write_tiny_checkpoint)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcnseg.cli", *args], cwd=cwd, env=single_thread_env(),
                          capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def reference_pth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A full-size (width 1, ~540 MB) FCN-8s state dict with pytorch-fcn's key names and random score layers."""
    torch.manual_seed(0)
    net = randomise_scores(build_fcn("fcn8s"), seed=1).eval()
    path = tmp_path_factory.mktemp("weights") / "fcn8s_from_caffe.pth"
    torch.save(net.state_dict(), path)
    return path, net


@pytest.mark.slow  # a full-size net written, imported, logged twice and run three times: about a minute
def test_imported_weights_predict_like_the_python_model_and_register(
        tmp_path: Path, reference_pth: tuple[Path, torch.nn.Module], single_thread: None) -> None:
    source, net = reference_pth
    image = noise_image(30, 41)
    Image.fromarray(image).save(tmp_path / "photo.png")
    expected = Segmenter(net, "caffe", device="cpu").predict(image)
    assert len(np.unique(expected)) > 1

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("import-weights", str(source), "--variant", "fcn8s", "--out", str(tmp_path / "x.ckpt"),
                     "--register", "fcn-imported", "--val-mean-iou", "0.62", "--tracking-uri", uri, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x.ckpt").is_file()
    assert "registered fcn-imported version 1" in result.stdout

    client = mlflow.MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("fcn-imported", "challenger")
    assert str(version.version) == "1" and version.tags["model"] == "fcn8s"
    assert float(version.tags["val_mean_iou"]) == pytest.approx(0.62)

    loaded = Segmenter.from_checkpoint(tmp_path / "x.ckpt", device="cpu")
    assert loaded.normalization == "caffe" and loaded.class_names == list(VOC_CLASSES)

    for name, model_args in [("ckpt", ["--model", str(tmp_path / "x.ckpt")]),
                             ("pth", ["--model", str(source), "--variant", "fcn8s"])]:
        out = tmp_path / f"out_{name}"
        # --runtime torch: bit-equal to the in-process net (auto may pick onnxruntime, equal on >= 99.9% of pixels)
        result = run_cli("predict", str(tmp_path / "photo.png"), *model_args, "--out", str(out), "--device", "cpu",
                         "--runtime", "torch", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        with Image.open(out / "photo.png") as png:
            assert png.mode == "P"
            assert np.array_equal(np.array(png), expected), name


@pytest.mark.parametrize("case", ["random bytes", "fcn16s weights as fcn8s", "unknown variant"])
def test_bad_source_is_one_error_line_exit_2(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    """In-process through the console script's ``main``: these fail before anything is written."""
    from fcnseg.cli import main

    source, variant = tmp_path / "weights.pth", "fcn8s"
    if case == "random bytes":
        source.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        torch.save(build_fcn(**{**TINY_NET, "name": "fcn16s"}).state_dict(), source)
        variant = "fcn9s" if case == "unknown variant" else "fcn8s"
    with pytest.raises(SystemExit) as info:
        main(["import-weights", str(source), "--variant", variant, "--out", str(tmp_path / "x.ckpt")])
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert ("fcn9s" if case == "unknown variant" else "weights.pth") in lines[0]
    assert not (tmp_path / "x.ckpt").exists()


def test_register_imported_model_without_a_measured_iou(tmp_path: Path) -> None:
    from fcnseg.publish import log_imported_model

    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.ckpt", normalization="caffe")
    version = log_imported_model(checkpoint, "fcn-imported", "src.pth", "fcn8s",
                                 tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert version == 1

    from fcnseg.registry import TrackingError, client_for, promote

    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "val_mean_iou" not in (client.get_model_version("fcn-imported", "1").tags or {})
    with pytest.raises(TrackingError, match="no val_mean_iou tag"):
        promote("fcn-imported", 1, client=client)  # nothing to compare: promotion needs a figure or --force
    assert promote("fcn-imported", 1, force=True, client=client).promoted
