"""The registered MLflow model holds outside this repo: its code travels with it, its requirements come from PyPI,
it carries weights only, and it loads and predicts with MLflow alone in a Python where fcnseg is not importable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from fcnseg import registry, serving
from fcnseg.inference import Segmenter, load_segmenter
from fcnseg.serving import decode_label_map, encode_image, log_pyfunc_model
from tests.test_inference import noise_image, single_thread, single_thread_env, write_tiny_checkpoint  # noqa: F401

SRC = Path(serving.__file__).resolve().parents[1]  # <checkout>/src, on sys.path through the editable install
MODEL_NAME = "fcn-portable"

# Runs in a fresh `python -I` (no PYTHONPATH, no cwd on sys.path) from a directory outside the checkout; the
# editable install's hooks are dropped too (a .pth entry for <checkout>/src, or setuptools' finder on
# sys.meta_path and its path hook), so `import fcnseg` really fails until MLflow puts the model's code on sys.path.
LOADER = textwrap.dedent("""
    import base64, importlib.util, io, json, sys
    src = sys.argv[1]
    sys.path[:] = [p for p in sys.path if not p.startswith(src) and "__editable__" not in p]
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in str(getattr(f, "__module__", ""))]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("fcnseg") is None, "fcnseg is importable before loading"
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    from PIL import Image
    model = mlflow.pyfunc.load_model(sys.argv[2])
    import fcnseg
    image = np.random.default_rng(1).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]}))
    print(json.dumps({"fcnseg_file": fcnseg.__file__, "mask": out["mask"][0],
                      "columns": list(out.columns), "sys_path_has_src": any(p.startswith(src) for p in sys.path)}))
""")


@pytest.fixture
def portable_model(tmp_path: Path) -> dict:
    """A tiny model (with optimiser state in its training checkpoint) logged, registered and made champion."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    training_checkpoint = torch.load(checkpoint, weights_only=True)
    # what a Lightning training checkpoint also holds: momentum buffers as large as the weights, loop state
    training_checkpoint["optimizer_states"] = [{"state": {i: {"momentum_buffer": v.clone()} for i, v in
                                                          enumerate(training_checkpoint["state_dict"].values())}}]
    training_checkpoint["loops"] = {"fit_loop": {"epoch_progress": {"current": 3}}}
    torch.save(training_checkpoint, checkpoint)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("portability-test")
        with mlflow.start_run() as run:
            model_uri = log_pyfunc_model(checkpoint, [noise_image(24, 32), noise_image(16, 20, seed=3)])
        client = registry.client_for(uri)
        version = registry.register_model(model_uri, MODEL_NAME, val_mean_iou=0.5, data_version="test", client=client)
        assert registry.promote(MODEL_NAME, version.version, client=client).promoted
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "downloaded")))
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    return {"uri": uri, "checkpoint": checkpoint, "model_uri": model_uri, "local": local, "run_id": run.info.run_id}


def test_model_carries_its_code_weights_only_and_index_requirements(portable_model: dict) -> None:
    local = portable_model["local"]
    code = local / "code" / "fcnseg"
    assert sorted(str(p.relative_to(code)) for p in code.rglob("*.py")) == sorted(serving.BUNDLED_MODULES)
    requirements = [line.strip() for line in (local / "requirements.txt").read_text().splitlines() if line.strip()]
    names = {line.split("==")[0].lower() for line in requirements}
    assert "fcnseg" not in names and not any(line.startswith(("-e", "file:", "/", ".")) for line in requirements)
    assert {"torch", "numpy", "pandas", "pillow", "albumentations", "mlflow"} <= names
    assert all("==" in line and "+" not in line for line in requirements), requirements  # pinned, PyPI versions
    conda = yaml.safe_load((local / "python_env.yaml").read_text())
    assert conda["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")

    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["signature"]["inputs"] and mlmodel["saved_input_example_info"]
    assert mlmodel["flavors"]["python_function"]["code"] == "code"
    weights_files = list((local / "artifacts").iterdir())
    assert [p.name for p in weights_files] == ["weights.pt"]  # one weights file, not the training checkpoint
    weights = torch.load(weights_files[0], weights_only=True)
    assert set(weights) == {"state_dict", "hyper_parameters"}
    assert set(weights["hyper_parameters"]) == {"net", "num_classes", "normalization", "class_names", "dataset"}
    assert weights["hyper_parameters"]["dataset"]["class_names"] == weights["hyper_parameters"]["class_names"]
    assert mlmodel["metadata"]["dataset"]["class_names"] == weights["hyper_parameters"]["class_names"]
    full = torch.load(portable_model["checkpoint"], weights_only=True)
    assert weights["state_dict"].keys() == full["state_dict"].keys()
    assert all(torch.equal(weights["state_dict"][k], full["state_dict"][k]) for k in full["state_dict"])
    assert weights_files[0].stat().st_size < 0.6 * portable_model["checkpoint"].stat().st_size


def test_model_loads_and_predicts_where_fcnseg_is_not_importable(tmp_path: Path, portable_model: dict,
                                                                 single_thread: None) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = elsewhere / "load_model.py"
    script.write_text(LOADER)
    env = {**single_thread_env(), "MLFLOW_TRACKING_URI": portable_model["uri"],
           "MLFLOW_REGISTRY_URI": portable_model["uri"]}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-I", str(script), str(SRC), f"models:/{MODEL_NAME}@champion"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the fcnseg that ran is the model's own copy, not this checkout
    assert not result["fcnseg_file"].startswith(str(SRC)) and "/code/fcnseg/" in result["fcnseg_file"]
    assert not result["sys_path_has_src"]
    assert result["columns"] == ["mask", "height", "width", "class_pixels", "error"]
    image = np.random.default_rng(1).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    expected = Segmenter.from_checkpoint(portable_model["checkpoint"], device="cpu").predict(image)
    assert np.array_equal(decode_label_map(result["mask"]), expected)


def test_in_process_loading_still_gives_the_segmenter(portable_model: dict, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", portable_model["uri"])
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_registry_uri(portable_model["uri"])
    try:
        segmenter = load_segmenter(f"models:/{MODEL_NAME}@champion", device="cpu")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    image = noise_image(21, 30, seed=5)
    reference = Segmenter.from_checkpoint(portable_model["checkpoint"], device="cpu")
    assert np.array_equal(segmenter.predict(image), reference.predict(image))
    assert segmenter.class_names == reference.class_names and segmenter.normalization == reference.normalization
    encoded = encode_image(image)
    assert isinstance(encoded, str)
