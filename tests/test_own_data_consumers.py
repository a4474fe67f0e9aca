"""Your own data, downstream (issue 20): a model trained on a dataset of N = 2, 3, 19 or 150 classes (folder,
Cityscapes and ADE20K layouts) calls its classes by the dataset's names and colours everywhere: MLflow metric keys,
the evaluation, the registered version's tags and model card, the pyfunc's answer and label PNG palette, lineage's
dataset input. Nothing refers to VOC. One tiny model per dataset, trained in-process once for the module, in one
real SQLite MLflow store."""

from __future__ import annotations

import base64
import json
from io import BytesIO
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fcnseg import lineage, registry
from fcnseg.data.classes import VOC_CLASSES
from fcnseg.data.dataset_spec import dataset_spec
from fcnseg.metrics import metric_keys
from fcnseg.runs import using_store
from tests.own_data import (SIZES, TINY_DATAMODULE, OwnData, image_for, train_ids, write_ade20k_dataset,
                            write_cityscapes_dataset, write_folder_dataset)
from tests.tiny import compose
from tests.voc_layout import write_voc_layout

CASES = (2, 3, 19, 150)


def write_voc_layout_dataset(root: Path, names: list[str]) -> OwnData:
    """The issue's first case: a folder in the VOC layout with classes of its own (``data=voc data.root=…
    data.class_names=[…]``)."""
    rng = np.random.default_rng(0)
    own = OwnData(root, "voc", names, ["data=voc", f"data.root={root}", f"data.class_names=[{','.join(names)}]"],
                  {"train": [f"img{i}" for i in range(4)], "val": ["img4", "img5"]}, {})
    samples = {}
    for index, image_id in enumerate(own.splits["train"] + own.splits["val"]):
        own.labels[image_id] = train_ids(len(names), index, SIZES[index])
        samples[image_id] = (image_for(own.labels[image_id], len(names), rng), own.labels[image_id])
        own.images[image_id] = root / "JPEGImages" / f"{image_id}.jpg"
    write_voc_layout(root, samples, own.splits)
    return own


def write_dataset(classes: int, root: Path):
    if classes == 2:  # VOC layout, own classes thing0, thing1: no class 0 "background"
        return write_voc_layout_dataset(root / "two" / "VOC2012", ["thing0", "thing1"])
    if classes == 3:
        return write_folder_dataset(root / "three", ["background", "road", "car"], mask_mode="L")
    if classes == 19:
        return write_cityscapes_dataset(root / "cityscapes")
    return write_ade20k_dataset(root / "ADEChallengeData2016")


def tiny_config(own, tmp: Path, uri: str, name: str):
    return compose([*own.overrides, *TINY_DATAMODULE, "model=fcn8s", "optim=adamw", "trainer=cpu",
                    "model.net.backbone_weights=null", "trainer.max_epochs=1", "data.input=null",
                    f"paths.data_dir={tmp / 'data'}", f"paths.output_dir={tmp / 'out'}",
                    f"tracking.tracking_uri={uri}", f"tracking.registered_model_name={name}",
                    "tracking.num_overlays=1"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per class count: the dataset, its config, training's result, the registered version and the store."""
    from fcnseg.train import train

    tmp = tmp_path_factory.mktemp("own-data")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    out = {"uri": uri, "client": client}
    for classes in CASES:
        own = write_dataset(classes, tmp / "datasets")
        name = f"own-{classes}"
        cfg = tiny_config(own, tmp / name, uri, name)
        result = train(cfg)
        metrics = json.loads(Path(client.download_artifacts(result["run_id"], "evaluation/metrics.json",
                                                            str(tmp / name))).read_text())
        data_version = lineage.data_version(cfg.data.root)
        version = registry.register_model(
            result["model_uri"], name, val_mean_iou=metrics["mean_iou"], data_version=data_version, client=client,
            evaluation=lineage.evaluation_set(cfg.data.root, cfg.data.datamodule.val_split, data_version, cfg.data),
            per_class_iou=metrics["per_class_iou"])
        out[classes] = {"own": own, "cfg": cfg, "result": result, "metrics": metrics, "version": version,
                        "spec": dataset_spec(dict(cfg.data))}
    return out


@pytest.mark.parametrize("classes", CASES)
def test_per_class_metrics_are_logged_under_the_datasets_class_names(trained: dict, classes: int) -> None:
    case = trained[classes]
    names = case["own"].class_names
    run = trained["client"].get_run(case["result"]["run_id"])
    logged = {key.removeprefix("val/iou/") for key in run.data.metrics if key.startswith("val/iou/")}
    assert logged and logged <= set(metric_keys(names)), logged - set(metric_keys(names))
    if classes == 19:
        assert "traffic light" in metric_keys(names)  # a name with a space stays readable
    assert not logged & (set(VOC_CLASSES) - set(names))  # no VOC name for a class that is not the dataset's
    # evaluation after training: every class of the dataset scored (classes >= 21 included), none other
    assert list(case["metrics"]["per_class_iou"]) == names
    assert run.data.tags["dataset"] == case["cfg"].data.name


@pytest.mark.parametrize("classes", CASES)
def test_registered_version_and_model_card_name_the_datasets_classes(trained: dict, classes: int) -> None:
    case = trained[classes]
    version = trained["client"].get_model_version(f"own-{classes}", case["version"].version)
    names = case["own"].class_names
    assert json.loads(version.tags["class_names"]) == names and version.tags["num_classes"] == str(classes)
    assert list(json.loads(version.tags["per_class_iou"])) == names
    card = version.description
    assert f"{classes} classes" in card and names[0] in card and names[1] in card
    assert "PASCAL VOC" not in card and "VOCtrainval" not in card
    assert f"`{case['cfg'].data.name}/" in card  # the dataset input, by the dataset's own name


@pytest.mark.parametrize("classes", CASES)
def test_lineage_names_the_datasets_own_source(trained: dict, classes: int) -> None:
    case = trained[classes]
    run = trained["client"].get_run(case["result"]["run_id"])
    urls = {json.loads(i.dataset.source)["url"] for i in run.inputs.dataset_inputs}
    assert urls and not any("VOCtrainval" in url or "robots.ox.ac.uk" in url for url in urls)
    if classes == 150:
        assert urls == {"http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"}
    elif classes in (2, 3):  # a folder used in place (VOC layout or not): not data.dvc's VOC tarball
        assert urls == {f"file://{Path(case['cfg'].data.root).resolve()}"}


def predict(trained: dict, classes: int, images: list[np.ndarray]) -> pd.DataFrame:
    from fcnseg.serving import encode_image

    with using_store(trained["uri"]):
        model = mlflow.pyfunc.load_model(f"models:/own-{classes}/{trained[classes]['version'].version}")
    return model, model.predict(pd.DataFrame({"image": [encode_image(image) for image in images]}))


@pytest.mark.parametrize("classes", CASES)
def test_pyfunc_answers_with_the_datasets_names_and_palette(trained: dict, classes: int) -> None:
    case = trained[classes]
    own, spec = case["own"], case["spec"]
    image = np.asarray(Image.open(next(iter(own.images.values()))).convert("RGB"))
    _, answer = predict(trained, classes, [image])
    row = answer.iloc[0]
    assert row["error"] == "" and (row["height"], row["width"]) == image.shape[:2]
    counts = json.loads(row["class_pixels"])
    assert counts and set(counts) <= set(own.class_names) and sum(counts.values()) == image.shape[0] * image.shape[1]
    png = Image.open(BytesIO(base64.b64decode(row["mask"])))
    palette = np.asarray(png.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(palette[:classes], spec.palette)  # the dataset's colours (Cityscapes' own)
    if classes == 19:
        assert tuple(palette[0]) == (128, 64, 128)  # Cityscapes' road, not VOC's black background


def forced(segmenter, class_index: int) -> None:
    """Makes the net predict ``class_index`` everywhere (its score bias far above the others)."""
    with torch.no_grad():
        segmenter.net.score_fr.bias.zero_()
        segmenter.net.score_fr.bias[class_index] = 1e4


def test_a_150_class_model_evaluates_and_serves_classes_past_21(trained: dict) -> None:
    from fcnseg.evaluate import evaluate_segmenter
    from fcnseg.serving import encode_image

    case = trained[150]
    names = case["own"].class_names
    image = np.zeros((33, 47, 3), np.uint8)
    model, _ = predict(trained, 150, [image])
    segmenter = model.unwrap_python_model().segmenter
    forced(segmenter, 140)
    answer = model.predict(pd.DataFrame({"image": [encode_image(image)]}))
    assert json.loads(answer.iloc[0]["class_pixels"]) == {names[140]: 33 * 47}
    report = evaluate_segmenter(segmenter, case["cfg"].data.root, case["own"].val_split,
                                data=dict(case["cfg"].data))
    hist = report.results["confusion_matrix"]
    assert hist.shape == (150, 150)
    valid = sum(int((label != 255).sum()) for stem, label in case["own"].labels.items()
                if stem in case["own"].splits["validation"])
    assert int(hist[:, 140].sum()) == valid  # every valid pixel counted, as predicted: class 140
    assert report.summary()["per_class_iou"][names[140]] is not None and len(report.summary()["per_class_iou"]) == 150


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_150_class_model_by_its_names_and_colours(trained: dict, tmp_path) -> None:
    """The real scoring server (``mlflow models serve``) of a 150-class model whose net predicts class 140."""
    from fcnseg.models.checkpoint import atomic_torch_save, read_checkpoint
    from fcnseg.serving import encode_image, log_pyfunc_model
    from tests.model_server import post, records, serve
    from tests.servers import stop
    from tests.test_inference import single_thread_env

    case = trained[150]
    checkpoint = read_checkpoint(case["result"]["best_checkpoint"])
    checkpoint["state_dict"]["net.score_fr.bias"] = torch.zeros(150).index_fill_(0, torch.tensor([140]), 1e4)
    atomic_torch_save(checkpoint, tmp_path / "forced.ckpt")
    from fcnseg.runs import experiment_id

    with using_store(trained["uri"]), mlflow.start_run(experiment_id=experiment_id(trained["client"], "forced")):
        model_uri = log_pyfunc_model(tmp_path / "forced.ckpt", [np.zeros((24, 32, 3), np.uint8)])
    server, url = serve(model_uri, tmp_path, {**single_thread_env(), "MLFLOW_TRACKING_URI": trained["uri"]})
    try:
        status, payload, _ = post(url, records(encode_image(np.zeros((33, 47, 3), np.uint8))))
    finally:
        stop(server)
    assert status == 200, payload
    row = payload["predictions"][0]
    names = case["own"].class_names
    assert json.loads(row["class_pixels"]) == {names[140]: 33 * 47}
    palette = np.asarray(Image.open(BytesIO(base64.b64decode(row["mask"]))).getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(palette[140], case["spec"].palette[140])


def test_reproduce_gets_each_dataset_from_its_own_source(trained: dict) -> None:
    from fcnseg.reproduce import own_data_steps, plan
    from tests.tiny import ROOT

    scripts = {classes: plan(trained["client"], f"models:/own-{classes}/{trained[classes]['version'].version}",
                             ROOT).script() for classes in CASES}
    for script in scripts.values():
        assert "data.dvc" not in script.split("# then compare")[0] and "fcnseg fetch" not in script
    assert "python -m fcnseg.pipeline prepare" in scripts[150] and "data.layout=ade20k" in scripts[150]
    assert "cityscapes-dataset.com" in scripts[19] and "python -m fcnseg.pipeline prepare" in scripts[19]
    for classes in (2, 3):  # folders read in place, the VOC-layout one included: no VOC tarball to pull
        assert "in place from" in scripts[classes] and "python -m fcnseg.pipeline prepare" not in scripts[classes]
    notes, optional = [], {}
    steps = own_data_steps({"source": "folder", "input": "own_data"}, ["data.layout=folder"], notes, optional, 1)
    assert steps == [["dvc", "pull", "own_data.dvc"], ["python", "-m", "fcnseg.pipeline", "prepare",
                                                       "data.layout=folder"]]
    assert "DVC remote" in optional[1]


def test_predict_and_evaluate_read_the_checkpoints_own_dataset(trained: dict, tmp_path) -> None:
    """`fcnseg predict` writes label PNGs in Cityscapes' colours with a legend of its names; `fcnseg evaluate`
    without a data config reads the split as the model's dataset says (Cityscapes labelIds mapped to trainIds)."""
    from fcnseg.evaluate import evaluate_segmenter
    from fcnseg.export import metadata_for
    from fcnseg.inference import Segmenter
    from fcnseg.predict import predict_files

    case = trained[19]
    segmenter = Segmenter.from_checkpoint(case["result"]["best_checkpoint"], device="cpu")
    image = next(iter(case["own"].images.values()))
    summary = predict_files([image], segmenter, tmp_path / "out", progress=False)
    mask_path, overlay_path = summary.written[0]
    with Image.open(mask_path) as png:
        palette = np.asarray(png.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(palette[:19], case["spec"].palette)
    assert Image.open(overlay_path).width > Image.open(image).width  # the legend of the classes present
    assert metadata_for(segmenter)["class_names"] == case["own"].class_names  # what an ONNX export carries
    report = evaluate_segmenter(segmenter, case["cfg"].data.root, "val")
    assert report.class_names == case["own"].class_names and report.results["confusion_matrix"].shape == (19, 19)
    valid = sum(int((case["own"].labels[stem] != 255).sum()) for stem in case["own"].splits["val"])
    assert int(report.results["confusion_matrix"].sum()) == valid  # labelIds 4, 9, 29 ignored, the rest mapped
