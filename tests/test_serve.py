"""The registered model served over HTTP by ``mlflow models serve`` (a real server process), as the docs show:
good images get masks, a batch answers each row, and bad or oversized input gets a bounded one-line 4xx."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from fcnseg import registry
from fcnseg.data.classes import VOC_CLASSES
from fcnseg.inference import Segmenter
from fcnseg.serving import decode_label_map, encode_image, log_pyfunc_model
from fcnseg.serving_guard import MAX_ERROR_BYTES
from tests.model_server import post, records, rss_bytes, serve
from tests.servers import stop
from tests.test_inference import (noise_image, png_claiming_size, single_thread, single_thread_env,  # noqa: F401
                                  write_tiny_checkpoint)

MODEL_NAME = "fcn-test"


def register_champion(tmp_path: Path) -> tuple[str, Path]:
    """A tiny model logged with log_pyfunc_model, registered and promoted to champion in a tmp sqlite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("serve-test")
        with mlflow.start_run():
            model_uri = log_pyfunc_model(checkpoint, [noise_image(24, 32)])
        client = registry.client_for(uri)
        version = registry.register_model(model_uri, MODEL_NAME, val_mean_iou=0.5, data_version="test", client=client)
        assert registry.promote(MODEL_NAME, version.version, client=client).promoted
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    return uri, checkpoint


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """The champion served with a 2 MB request limit and a 300 MB forward-pass limit (tiny net: ~1500x1500 px)."""
    tmp_path = tmp_path_factory.mktemp("serve")
    uri, checkpoint = register_champion(tmp_path)
    env = {**single_thread_env(), "MLFLOW_TRACKING_URI": uri, "FCNSEG_MAX_REQUEST_MB": "2",
           "FCNSEG_MAX_FORWARD_MB": "300"}
    server, url = serve(f"models:/{MODEL_NAME}@champion", tmp_path, env)
    try:
        yield {"url": url, "checkpoint": checkpoint, "server": server, "log": tmp_path / "serve.log"}
    finally:
        stop(server)


def assert_one_line_error(status: int, payload, size: int, *needles: str) -> str:
    assert 400 <= status < 500, (status, payload)
    assert size <= MAX_ERROR_BYTES, size
    assert isinstance(payload, dict) and set(payload) == {"error_code", "message"}, payload
    message = payload["message"]
    assert "\n" not in message and "Traceback" not in message and "/tmp" not in message, message
    assert "Encountered an unexpected error" not in message and "Failed to predict" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_served_champion_segments_a_posted_image(served: dict, single_thread: None) -> None:
    images = [noise_image(37, 53, seed=1), noise_image(20, 24, seed=2)]  # two sizes in one request
    status, payload, _ = post(served["url"], records(*(encode_image(image) for image in images)))
    assert status == 200, payload
    predictions = payload["predictions"]
    assert len(predictions) == len(images)
    reference = Segmenter.from_checkpoint(served["checkpoint"], device="cpu")
    for image, row in zip(images, predictions):
        height, width = image.shape[:2]
        label_map = decode_label_map(row["mask"])
        assert label_map.shape == (height, width) and (row["height"], row["width"]) == (height, width)
        assert np.array_equal(label_map, reference.predict(image))
        assert row["error"] == ""
        class_pixels = json.loads(row["class_pixels"])
        assert sum(class_pixels.values()) == height * width
        assert set(class_pixels) <= set(VOC_CLASSES)
        expected = {VOC_CLASSES[c]: int(n) for c, n in zip(*np.unique(label_map, return_counts=True))}
        assert class_pixels == expected


def test_a_batch_answers_each_row_and_an_all_bad_request_is_a_400_naming_the_rows(served: dict) -> None:
    good = encode_image(noise_image(21, 27, seed=3))
    bad = base64.b64encode(b"not an image").decode()
    status, payload, _ = post(served["url"], records(good, bad, good, "%%% not base64 %%%"))
    assert status == 200, payload
    rows = payload["predictions"]
    assert [bool(row["mask"]) for row in rows] == [True, False, True, False]
    assert rows[0]["error"] == "" and rows[1]["error"].startswith("row 1: not a readable image"), rows[1]
    assert rows[3]["error"].startswith("row 3:"), rows[3]
    assert decode_label_map(rows[2]["mask"]).shape == (21, 27)

    message = assert_one_line_error(*post(served["url"], records(bad, bad)), "row 0", "row 1", "not a readable image")
    assert message.startswith("row 0:")


def test_a_large_image_is_refused_by_its_forward_cost_before_decoding(served: dict) -> None:
    before = rss_bytes(served["server"].pid)
    bomb = base64.b64encode(png_claiming_size(10_000, 10_000)).decode()  # 100 M pixels claimed, ~200 bytes sent
    started = time.monotonic()
    message = assert_one_line_error(*post(served["url"], records(bomb)), "row 0", "10000x10000",
                                    "FCNSEG_MAX_FORWARD_MB")
    elapsed = time.monotonic() - started
    large = base64.b64encode(png_claiming_size(2_000, 1_500)).decode()  # under PIL's bomb limit, over ours
    assert_one_line_error(*post(served["url"], records(large)), "2000x1500", "MB")
    after = rss_bytes(served["server"].pid)
    # refused from the header: no 100-megapixel buffer was ever allocated (that alone would be 300 MB of RGB)
    assert after - before < 100 * 1024 * 1024, (before, after, elapsed, message)


def test_oversized_and_malformed_bodies_get_bounded_one_line_errors(served: dict) -> None:
    junk = b"x" * (3 * 1024 * 1024)  # over the 2 MB limit set for this server
    message = assert_one_line_error(*post(served["url"], junk), "limit of 2,097,152 bytes", "FCNSEG_MAX_REQUEST_MB")
    assert message
    status, payload, size = post(served["url"], b"{" + b"y" * 1_500_000)  # under the limit, not JSON
    assert_one_line_error(status, payload, size, "JSON")
    assert_one_line_error(*post(served["url"], json.dumps({"dataframe_records": [{"picture": "x"}]}).encode()))
    assert_one_line_error(*post(served["url"], b"[1, 2]"))
    # the server is still alive and still segments
    status, payload, _ = post(served["url"], records(encode_image(noise_image(16, 16))))
    assert status == 200 and payload["predictions"][0]["error"] == ""
    assert served["server"].poll() is None


def test_a_small_load_of_mixed_requests_is_answered_and_the_server_holds(served: dict) -> None:
    """The bounded version of benchmarks/serving_load.py: 4 clients x 4 requests, good and bad mixed."""
    from tests.model_server import load_test

    bodies = [records(encode_image(noise_image(60, 80, seed=5))),
              records(base64.b64encode(png_claiming_size(10_000, 10_000)).decode()),
              b"\x00junk" * 600_000,  # 3 MB: over this server's 2 MB limit
              records(base64.b64encode(b"not an image").decode())]
    before = rss_bytes(served["server"].pid)
    result = load_test(served["url"], bodies, clients=4, requests_per_client=4, timeout=120)
    after = rss_bytes(served["server"].pid)
    assert result["transport_errors"] == 0 and result["server_errors"] == 0, result
    assert result["statuses"] == {"200": 4, "400": 8, "413": 4}, result
    assert served["server"].poll() is None
    assert after - before < 300 * 1024 * 1024, (before, after)


def test_error_messages_are_shaped_to_one_bounded_line() -> None:
    from fcnseg.serving_guard import MESSAGE_CHARS, error_message

    body = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "stack_trace": "Traceback (most recent call last)",
                       "message": "Failed to predict data '   image\n0  iVBOR...'. \nError: row 0: cannot read "
                                  "/srv/models/x.png; see https://mlflow.org/docs/latest"}).encode()
    assert error_message(body, 400) == ("INVALID_PARAMETER_VALUE",
                                        "row 0: cannot read <path>; see https://mlflow.org/docs/latest")
    code, message = error_message(b"x" * 5_000_000, 400)  # a huge non-JSON body: cut, one line
    assert code == "BAD_REQUEST" and len(message) == MESSAGE_CHARS
    assert error_message(b"Request processing time exceeded limit", 504) == (
        "TIMEOUT", "Request processing time exceeded limit")
