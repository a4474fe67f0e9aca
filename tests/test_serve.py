"""The registered model served over HTTP by ``mlflow models serve`` (a real server process), as the README shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from fcnseg import registry
from fcnseg.data.classes import VOC_CLASSES
from fcnseg.inference import Segmenter
from fcnseg.serving import decode_label_map, encode_image, log_pyfunc_model
from tests.servers import free_port, stop
from tests.test_inference import noise_image, single_thread, single_thread_env, write_tiny_checkpoint  # noqa: F401

MODEL_NAME = "fcn-test"


def wait_for_ping(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer from {url}/ping within {timeout:.0f} s")


@pytest.fixture
def registered_champion(tmp_path: Path) -> tuple[str, Path]:
    """A tiny model logged with log_pyfunc_model, registered and promoted to champion in a tmp sqlite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("serve-test")
        with mlflow.start_run():
            model_uri = log_pyfunc_model(checkpoint, [noise_image(24, 32)])
        client = registry.client_for(uri)
        version = registry.register_model(model_uri, MODEL_NAME, val_mean_iou=0.5, data_version="test", client=client)
        assert registry.promote(MODEL_NAME, version.version, client=client).promoted
    finally:
        mlflow.set_tracking_uri(previous)
    return uri, checkpoint


def test_served_champion_segments_a_posted_image(tmp_path: Path, registered_champion: tuple[str, Path],
                                                 single_thread: None) -> None:
    uri, checkpoint = registered_champion
    port = free_port()
    # mlflow execs `uvicorn` by name: the environment's bin dir must be on PATH, as in an activated venv
    env = {**single_thread_env(), "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "wb"),
        start_new_session=True,  # its own process group: the workers it spawns stop with it
    )
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_ping(url, server)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; server log:\n{(tmp_path / 'serve.log').read_text()[-3000:]}") from None
        images = [noise_image(37, 53, seed=1), noise_image(20, 24, seed=2)]  # two sizes in one request
        body = json.dumps({"dataframe_records": [{"image": encode_image(image)} for image in images]}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            payload = json.loads(response.read())
        predictions = payload["predictions"]
        assert len(predictions) == len(images)
        reference = Segmenter.from_checkpoint(checkpoint, device="cpu")
        for image, row in zip(images, predictions):
            height, width = image.shape[:2]
            label_map = decode_label_map(row["mask"])
            assert label_map.shape == (height, width) and (row["height"], row["width"]) == (height, width)
            assert np.array_equal(label_map, reference.predict(image))
            class_pixels = json.loads(row["class_pixels"])
            assert sum(class_pixels.values()) == height * width
            assert set(class_pixels) <= set(VOC_CLASSES)
            expected = {VOC_CLASSES[c]: int(n) for c, n in zip(*np.unique(label_map, return_counts=True))}
            assert class_pixels == expected

        bad = json.dumps({"dataframe_records": [{"image": "bm90IGFuIGltYWdl"}]}).encode()  # "not an image"
        request = urllib.request.Request(f"{url}/invocations", data=bad, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=60)
        assert info.value.code in (400, 500)
        assert "row 0" in info.value.read().decode()
    finally:
        stop(server)  # the whole process group, also when the server already exited (its error is the one raised)
