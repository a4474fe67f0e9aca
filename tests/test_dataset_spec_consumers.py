"""What each consumer does with a dataset's spec, in isolation: metric keys, overlay tinting and colours, old
checkpoints read back as VOC, the promotion gate's class check, class_pixels past 21 classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fcnseg import viz
from fcnseg.data.classes import VOC_CLASSES, voc_palette
from fcnseg.data.dataset_spec import DatasetSpec, dataset_spec
from fcnseg.metrics import metric_keys
from fcnseg.models import build_fcn
from fcnseg.registry.gate import decide

CITY = dataset_spec({"name": "city", "class_names": ["road", "car"], "palette": [[128, 64, 128], [0, 0, 142]]})


def test_metric_keys_are_valid_mlflow_names_one_per_class() -> None:
    from mlflow.utils.validation import _validate_metric_name

    names = ["traffic light", "a/b", "x:y", "a_b", "chair, seat", "..", "über"]
    keys = metric_keys(names)
    assert keys[0] == "traffic light" and len(set(keys)) == len(names)  # a/b and a_b stay apart
    for key in keys:
        _validate_metric_name(f"val/iou/{key}")
        assert "/" not in key


def test_overlay_tints_class_0_unless_it_is_a_voc_style_background() -> None:
    image = np.full((8, 8, 3), 200, np.uint8)
    labels = np.zeros((8, 8), np.uint8)
    labels[4:] = 1
    tinted = viz.overlay(image, labels, legend=False, dataset=CITY)
    assert tuple(tinted[0, 0]) == (164, 132, 164)  # road, half blended in Cityscapes' colour
    assert tuple(tinted[7, 7]) == (100, 100, 171)  # car
    voc = viz.overlay(image, labels, legend=False)  # VOC's background stays the photo
    assert tuple(voc[0, 0]) == (200, 200, 200)
    own = dataset_spec({"class_names": ["background", "road", "car"]})
    assert tuple(viz.overlay(image, labels, legend=False, dataset=own)[0, 0]) == (200, 200, 200)
    np.testing.assert_array_equal(viz.colorize(labels, CITY)[7, 7], [0, 0, 142])


def test_old_checkpoints_without_dataset_metadata_read_back_as_voc(tmp_path) -> None:
    from fcnseg.inference import Segmenter
    from fcnseg.models.checkpoint import save_net_checkpoint

    net = build_fcn("fcn32s", num_classes=21, width=0.0625)
    config = {"name": "fcn32s", "num_classes": 21, "width": 0.0625, "backbone_weights": None}
    path = save_net_checkpoint(net, config, tmp_path / "old.ckpt", "imagenet", list(VOC_CLASSES))
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["hyper_parameters"]["dataset"]  # as written before datasets were described
    torch.save(checkpoint, path)
    segmenter = Segmenter.from_checkpoint(path, device="cpu")
    assert segmenter.dataset.is_voc and segmenter.dataset.name == "voc2012"
    np.testing.assert_array_equal(segmenter.palette, voc_palette(256))


def test_a_checkpoints_dataset_comes_back_with_its_names_palette_and_ignore_index(tmp_path) -> None:
    from fcnseg.inference import Segmenter
    from fcnseg.models.checkpoint import save_net_checkpoint

    spec = dataset_spec({"name": "ade", "class_names": [f"c{i}" for i in range(150)], "ignore_index": 255,
                         "layout": "ade20k", "reduce_zero_label": True})
    net = build_fcn("fcn32s", num_classes=150, width=0.0625)
    config = {"name": "fcn32s", "num_classes": 150, "width": 0.0625, "backbone_weights": None}
    path = save_net_checkpoint(net, config, tmp_path / "ade.ckpt", "imagenet", list(spec.class_names), spec)
    segmenter = Segmenter.from_checkpoint(path, device="cpu")
    assert segmenter.class_names == list(spec.class_names) and segmenter.dataset.reduce_zero_label
    np.testing.assert_array_equal(segmenter.dataset.palette, spec.palette)


def test_class_pixels_name_every_class_the_map_holds() -> None:
    from fcnseg.serving_io import ForwardCost, Limits, answer_rows, encode_image

    names = [f"c{i}" for i in range(150)]
    label_map = np.array([[0, 21, 149, 149]], np.uint8)
    answer = answer_rows([encode_image(np.zeros((1, 4, 3), np.uint8))], lambda image: label_map, names,
                         ForwardCost(4, 150), Limits())
    assert json.loads(answer.iloc[0]["class_pixels"]) == {"c0": 1, "c21": 1, "c149": 2}


@pytest.mark.parametrize("champion_classes,decision", [(["road", "car"], "promoted"), (["road", "bus"], "refused")])
def test_the_gate_compares_only_models_of_the_same_classes(champion_classes, decision) -> None:
    common = {"data_version": "d", "eval_split": "val", "eval_ids_sha256": "h"}
    challenger = {**common, "val_mean_iou": "0.6", "class_names": json.dumps(["road", "car"]),
                  "per_class_iou": json.dumps({"road": 0.6, "car": 0.6})}
    champion = {**common, "val_mean_iou": "0.5", "class_names": json.dumps(champion_classes),
                "per_class_iou": json.dumps(dict.fromkeys(champion_classes, 0.5))}
    result = decide("m", 2, challenger, champion, 1)
    assert result.decision == decision
    if decision == "refused":
        assert "not the same classes" in result.reason


def test_an_onnx_models_segmenter_names_its_dataset_from_its_metadata() -> None:
    from types import SimpleNamespace

    from fcnseg.inference import segmenter_dataset

    onnx_like = SimpleNamespace(class_names=["road", "car"], palette=CITY.png_palette(),
                                metadata={"dataset": CITY.to_metadata()})
    assert segmenter_dataset(onnx_like).name == "city"
    np.testing.assert_array_equal(segmenter_dataset(onnx_like).palette, CITY.palette)
    bare = SimpleNamespace(class_names=["road", "car"], palette=CITY.png_palette())  # metadata of older exports
    assert segmenter_dataset(bare).class_names == ("road", "car")
    np.testing.assert_array_equal(segmenter_dataset(bare).palette, CITY.palette)
