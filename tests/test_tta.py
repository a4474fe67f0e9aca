"""Test-time augmentation: the conf/tta group, averaged softmax over scales and flips (PyTorch, CUDA-style batched
scales run on CPU here, onnxruntime in numpy), and its use by evaluate, predict and both served models."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from fcnseg.config import CONFIG_DIR
from fcnseg.errors import ConfigError
from fcnseg.export import metadata_for, export_onnx
from fcnseg.inference import Segmenter
from fcnseg.onnx_model import OnnxSegmenter
from fcnseg.serving import log_pyfunc_model
from fcnseg.serving_io import decode_label_map, encode_image
from fcnseg.tta import as_tta, tta_probabilities
from fcnseg.tta_spec import PRESETS, TTASpec, parse_tta
from tests.test_inference import noise_image, single_thread, tiny_net, write_tiny_checkpoint  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def test_presets_are_the_conf_tta_group() -> None:
    files = {p.stem: yaml.safe_load(p.read_text()) for p in (Path(CONFIG_DIR) / "tta").glob("*.yaml")}
    assert set(files) == set(PRESETS)
    for name, values in files.items():
        assert as_tta(name) == PRESETS[name] == TTASpec.make(values["scales"], values["flip"])
    assert PRESETS["mmseg"].scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and PRESETS["mmseg"].passes == 12


def test_spec_strings_and_bad_settings() -> None:
    assert parse_tta("0.5,1,1.5+flip") == TTASpec((0.5, 1.0, 1.5), True)
    assert parse_tta(None) == TTASpec() and not TTASpec().active
    for bad in ("0.5,x", "1+mirror", "0,1"):
        with pytest.raises(ConfigError):
            parse_tta(bad)
    with pytest.raises(ConfigError, match="choose one of"):
        as_tta("nope")


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror_image() -> None:
    segmenter = Segmenter(tiny_net(), "imagenet", device="cpu")
    image = noise_image(29, 41)
    probs = tta_probabilities(segmenter, image, TTASpec((1.0,), True))
    plain = segmenter.scores([image])[0].softmax(0)
    mirrored = segmenter.scores([np.ascontiguousarray(image[:, ::-1])])[0].softmax(0).flip(-1)
    torch.testing.assert_close(probs, (plain + mirrored) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(0), torch.ones(29, 41), atol=1e-5, rtol=1e-5)
    assert torch.equal(tta_probabilities(segmenter, image, TTASpec()).argmax(0), plain.argmax(0))


def test_multi_scale_tta_changes_the_prediction_and_predict_uses_it() -> None:
    segmenter = Segmenter(tiny_net(), "imagenet", device="cpu")
    image = noise_image(40, 56, 1)
    plain = segmenter.predict(image)
    segmenter.tta = PRESETS["mmseg"]
    augmented = segmenter.predict(image)
    assert augmented.shape == plain.shape and not np.array_equal(augmented, plain)
    expected = tta_probabilities(segmenter, image, PRESETS["mmseg"]).argmax(0).numpy()
    assert np.array_equal(augmented, expected)


def test_batched_scales_the_cuda_path_agree_with_one_pass_per_scale() -> None:
    """CUDA batches the scales (zero-padded to the largest); no GPU here, so the same code runs on CPU."""
    segmenter = Segmenter(tiny_net(), "imagenet", device="cpu")
    image = noise_image(48, 64, 2)
    one_by_one = tta_probabilities(segmenter, image, PRESETS["mmseg"], batch_scales=False)
    batched = tta_probabilities(segmenter, image, PRESETS["mmseg"], batch_scales=True)
    assert (one_by_one.argmax(0) == batched.argmax(0)).float().mean() >= 0.98
    assert (one_by_one - batched).abs().max() < 0.1


def test_onnx_tta_agrees_with_pytorch_tta(tmp_path: Path) -> None:
    segmenter = Segmenter(tiny_net(), "imagenet", device="cpu", precision="fp32")  # as ONNX runs, on any CPU
    export_onnx(segmenter, tmp_path / "m.onnx", sizes=((9, 11),))
    onnx = OnnxSegmenter(tmp_path / "m.onnx", metadata_for(segmenter), threads=1, tta=PRESETS["mmseg"])
    image = noise_image(44, 60, 3)
    want = tta_probabilities(segmenter, image, PRESETS["mmseg"]).argmax(0).numpy()
    assert (onnx.predict(image) == want).mean() >= 0.99


def test_served_pytorch_model_applies_fcnseg_tta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("tta")  # not the experiment id an earlier test in this process made active elsewhere
    with mlflow.start_run():
        uri = log_pyfunc_model(checkpoint, [noise_image(16, 16)])
    monkeypatch.setenv("FCNSEG_TTA", "0.75,1+flip")
    model = mlflow.pyfunc.load_model(uri)
    image = noise_image(30, 38, 4)
    out = model.predict(pd.DataFrame({"image": [encode_image(image)]}))
    reference = Segmenter.from_checkpoint(checkpoint, device="cpu")
    reference.tta = TTASpec((0.75, 1.0), True)
    assert np.array_equal(decode_label_map(out["mask"][0]), reference.predict(image))


def test_evaluate_cli_with_tta(tmp_path: Path, voc_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fcnseg.cli import main

    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    outs = {}
    for tta in ("none", "flip"):
        main(["evaluate", "--model", str(checkpoint), "--data", str(voc_root), "--split", "val", "--out",
              str(tmp_path / tta), "--device", "cpu", "--runtime", "torch", "--num-overlays", "0", "--tta", tta])
        outs[tta] = json.loads((tmp_path / tta / "metrics.json").read_text())
    assert outs["none"]["pixel_acc"] != outs["flip"]["pixel_acc"]  # the flip really ran
