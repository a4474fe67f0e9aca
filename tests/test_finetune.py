"""Fine-tuning to N classes (``model.finetune_from``) and staged training for any N: the backbone and fc layers come
from the source model (a VOC checkpoint, or a registered model), the score layers start at zero and the upsampling
at bilinear again, sized for the new dataset's classes."""

from __future__ import annotations

import mlflow
import pytest
import torch

from fcnseg.errors import CheckpointError, ConfigError
from fcnseg.models import build_fcn
from fcnseg.models.checkpoint import save_net_checkpoint
from fcnseg.models.fcn import bilinear_kernel
from fcnseg.runs import using_store
from tests.own_data import TINY_DATAMODULE, write_folder_dataset
from tests.test_own_data_consumers import compose

WIDTH = 0.0625
NAMES = ["background", "road", "car"]


def voc_checkpoint(path, name: str = "fcn8s", normalization: str = "imagenet"):
    """A 21-class (VOC) FCN whose every tensor, score layers and upsampling included, is non-trivial."""
    torch.manual_seed(0)
    net = build_fcn(name, num_classes=21, width=WIDTH)
    with torch.no_grad():
        for tensor in net.state_dict().values():
            tensor.normal_()
    config = {"name": name, "num_classes": 21, "width": WIDTH, "backbone_weights": None,
              "learnable_upsampling": False}
    save_net_checkpoint(net, config, path, normalization, [f"voc{i}" for i in range(21)])
    return net


def finetune_config(tmp_path, source, *extra: str):
    own = write_folder_dataset(tmp_path / "own", NAMES)
    return compose([*own.overrides, *TINY_DATAMODULE, "model=fcn8s", "optim=adamw", "data.input=null",
                    f"model.finetune_from={source}", f"paths.data_dir={tmp_path / 'data'}", *extra])


def assert_finetuned(net: torch.nn.Module, source: torch.nn.Module, classes: int) -> None:
    state, old = net.state_dict(), source.state_dict()
    backbone = [key for key in state if not key.startswith(("score_", "upscore"))]
    assert backbone and all(torch.equal(state[key], old[key]) for key in backbone)  # conv1_1 ... fc7 kept
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = getattr(net, name)
        assert layer.out_channels == classes and not layer.weight.any() and not layer.bias.any()
    for name in ("upscore2", "upscore_pool4", "upscore8"):
        layer = getattr(net, name)
        assert torch.equal(layer.weight, bilinear_kernel(classes, layer.kernel_size[0]))


def test_finetuning_a_voc_checkpoint_to_three_classes_keeps_the_backbone_and_resets_the_score_layers(tmp_path):
    from fcnseg.train import build_module

    source = voc_checkpoint(tmp_path / "voc.ckpt")
    module = build_module(finetune_config(tmp_path, tmp_path / "voc.ckpt"))
    assert module.class_names == NAMES and module.net.num_classes == 3
    assert module.hparams.net["backbone_weights"] is None  # no VGG16 download: every backbone tensor is copied
    assert_finetuned(module.net, source, 3)


def test_finetuning_keeps_nothing_class_specific_even_with_as_many_classes(tmp_path):
    from fcnseg.models.weights import load_for_finetuning

    source = voc_checkpoint(tmp_path / "voc.ckpt")
    net = build_fcn("fcn8s", num_classes=21, width=WIDTH)
    load_for_finetuning(net, tmp_path / "voc.ckpt")
    assert_finetuned(net, source, 21)


def test_finetuning_from_a_registered_voc_model(tmp_path):
    from fcnseg import registry
    from fcnseg.runs import experiment_id
    from fcnseg.serving import log_pyfunc_model
    from fcnseg.train import build_module
    import numpy as np

    source = voc_checkpoint(tmp_path / "voc.ckpt", name="fcn32s")  # another variant: its backbone is all that moves
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    with using_store(uri), mlflow.start_run(experiment_id=experiment_id(client, "finetune-source")):
        model_uri = log_pyfunc_model(tmp_path / "voc.ckpt", [np.zeros((24, 32, 3), np.uint8)])
    registry.register_model(model_uri, "fcn-voc-tiny", val_mean_iou=None, data_version=None, client=client,
                            model_card=False)
    module = build_module(finetune_config(tmp_path, "models:/fcn-voc-tiny@challenger", f"tracking.tracking_uri={uri}"))
    assert_finetuned(module.net, source, 3)


def test_finetuning_refuses_weights_for_another_input_normalisation_or_width(tmp_path):
    from fcnseg.train import build_module

    voc_checkpoint(tmp_path / "caffe.ckpt", normalization="caffe")  # what `fcnseg import-weights` writes
    with pytest.raises(ConfigError, match="model.normalization=caffe"):
        build_module(finetune_config(tmp_path, tmp_path / "caffe.ckpt"))
    build_module(finetune_config(tmp_path, tmp_path / "caffe.ckpt", "model.normalization=caffe"))
    voc_checkpoint(tmp_path / "voc.ckpt")
    with pytest.raises(CheckpointError, match="model.net.width"):
        build_module(finetune_config(tmp_path, tmp_path / "voc.ckpt", "model.net.width=0.125"))
    with pytest.raises(ConfigError, match="exclusive"):
        build_module(finetune_config(tmp_path, tmp_path / "voc.ckpt", f"model.init_from={tmp_path / 'voc.ckpt'}"))


def test_staged_training_works_for_any_class_count(tmp_path):
    """FCN-16s from a 3-class FCN-32s: the coarser net's score layer and shared upsampling carry over."""
    from fcnseg.train import build_module

    own = write_folder_dataset(tmp_path / "own", NAMES)
    common = [*own.overrides, *TINY_DATAMODULE, "optim=adamw", "data.input=null", "model.net.backbone_weights=null"]
    coarse = build_module(compose([*common, "model=fcn32s"]))
    with torch.no_grad():
        coarse.net.score_fr.weight.normal_()
    config = {**coarse.hparams.net}
    config.pop("_target_")
    save_net_checkpoint(coarse.net, config, tmp_path / "fcn32s.ckpt", "imagenet", NAMES)
    finer = build_module(compose([*common, "model=fcn16s", f"model.init_from={tmp_path / 'fcn32s.ckpt'}"]))
    assert finer.net.num_classes == 3 and finer.class_names == NAMES
    assert torch.equal(finer.net.score_fr.weight, coarse.net.score_fr.weight)
    assert not finer.net.score_pool4.weight.any()  # the new skip starts at zero: FCN-16s predicts what 32s did
