"""The Hydra config tree: every group composes, params.yaml is what DVC composes, bad overrides are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=overrides)


def test_committed_params_yaml_is_what_dvc_composes(tmp_path):
    """`dvc repro` reads params.yaml as committed; it must equal the composition of conf/ with no overrides."""
    from dvc.utils.hydra import compose_and_dump

    fresh = tmp_path / "params.yaml"
    compose_and_dump(fresh, str(CONF), None, "config", "", [])
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == yaml.safe_load(fresh.read_text()), (
        "params.yaml is stale: regenerate it with `python -m fcnseg.pipeline params`"
    )


@pytest.mark.parametrize("group,options", [
    ("model", ["fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"]),
    ("data", ["voc", "voc_sbd", "synthetic"]),
    ("optim", ["sgd", "sgd_poly", "sgd_paper", "adamw"]),
    ("trainer", ["default", "cpu", "gpu", "ddp"]),
    ("experiment", ["quickstart", "voc", "paper", "paper_staged_32s", "paper_staged_16s", "paper_staged_8s"]),
])
def test_every_config_group_option_composes_and_resolves(group, options):
    for option in options:
        cfg = _compose([f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=True)  # no dangling interpolation
        if group == "model":
            assert cfg.model.net.name == cfg.model.name == option


def test_quickstart_is_offline_tiny_and_cpu():
    cfg = _compose(["experiment=quickstart"])
    assert cfg.data.source == "synthetic"
    assert cfg.model.net.backbone_weights is None  # nothing to download
    assert cfg.model.net.width == 0.125
    assert cfg.trainer.accelerator == "cpu"
    # the prepare stage must not depend on the VOC tarball (data.dvc), or a fresh clone could not run it offline
    assert "VOCtrainval" not in cfg.data.prepare_dep


# The Caffe solvers (shelhamer/fcn.berkeleyvision.org voc-fcn*/solver.prototxt): model, lr, iterations, init.
PAPER_PRESETS = {
    "paper": ("fcn8s_atonce", 1e-10, 300_000, None),
    "paper_staged_32s": ("fcn32s", 1e-10, 100_000, None),
    "paper_staged_16s": ("fcn16s", 1e-12, 100_000, "runs/paper_staged_32s/checkpoints/best.ckpt"),
    "paper_staged_8s": ("fcn8s", 1e-14, 100_000, "runs/paper_staged_16s/checkpoints/best.ckpt"),
}


@pytest.mark.parametrize("preset", sorted(PAPER_PRESETS))
def test_paper_presets_are_the_caffe_solver(preset):
    name, lr, steps, init_from = PAPER_PRESETS[preset]
    cfg = OmegaConf.to_container(_compose([f"experiment={preset}"]), resolve=True)
    assert cfg["model"]["net"]["name"] == name
    assert cfg["model"]["net"]["learnable_upsampling"] is False  # fixed bilinear
    assert cfg["model"]["init_from"] == init_from
    # each stage starts from the previous stage's output directory
    assert cfg["paths"]["output_dir"] == ("runs/paper" if preset == "paper" else f"runs/{preset}")
    optim = cfg["optim"]
    assert optim["optimizer"]["_target_"] == "torch.optim.SGD"
    assert optim["optimizer"]["lr"] == lr and optim["lr"] == lr
    assert optim["optimizer"]["momentum"] == 0.99
    assert optim["optimizer"]["weight_decay"] == 5e-4
    assert (optim["bias_lr_mult"], optim["bias_weight_decay"]) == (2.0, 0.0)
    assert optim["loss_reduction"] == "sum" and optim["scheduler"] is None
    data = cfg["data"]
    assert (data["datamodule"]["train_split"], data["datamodule"]["val_split"]) == ("train_aug", "seg11valid")
    assert data["sbd"] is True
    assert data["datamodule"]["batch_size"] == 1
    assert data["datamodule"]["train_transform"] == {
        "crop_size": None, "scale_min": 1.0, "scale_max": 1.0, "hflip": False, "color_jitter": 0.0}
    trainer = cfg["trainer"]
    assert trainer["max_steps"] == steps and trainer["max_epochs"] == -1
    assert trainer["val_check_interval"] == 4000 and trainer["check_val_every_n_epoch"] is None
    assert trainer["benchmark"] is False  # whole images of many sizes: no per-size cuDNN autotuning


def test_paper_staged_inits_chain_to_the_previous_stage():
    stages = ["paper_staged_32s", "paper_staged_16s", "paper_staged_8s"]
    cfgs = [_compose([f"experiment={stage}"]) for stage in stages]
    for previous, current in zip(cfgs, cfgs[1:]):
        assert current.model.init_from == f"{previous.paths.output_dir}/checkpoints/best.ckpt"


def test_paper_preset_trains_on_whole_images_with_the_caffe_optimiser():
    """What the preset builds: training input = evaluation input (no crop/scale/flip/jitter), batch 1, and an SGD
    with the paper's two parameter groups on a summed loss; the fixed upsamplers are not optimised."""
    import numpy as np
    import torch

    from fcnseg.data.transforms import build_eval_transform, build_train_transform
    from fcnseg.train import build_module

    cfg = _compose(["experiment=paper", "model.net.width=0.125", "model.net.backbone_weights=null"])
    transform = OmegaConf.to_container(cfg.data.datamodule.train_transform, resolve=True)
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = np.random.default_rng(1).integers(0, 21, (37, 53), dtype=np.uint8)
    for seed in range(3):
        out = build_train_transform(**transform, normalization=cfg.model.normalization, seed=seed)(
            image=image, mask=mask)
        expected = build_eval_transform(cfg.model.normalization)(image=image, mask=mask)
        assert torch.equal(out["image"], expected["image"]) and torch.equal(out["mask"], expected["mask"])

    module = build_module(cfg)
    assert module.criterion.reduction == "sum"
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    weights, biases = optimizer.param_groups
    assert weights["lr"] == 1e-10 and weights["momentum"] == 0.99 and weights["weight_decay"] == 5e-4
    assert biases["lr"] == 2e-10 and biases["weight_decay"] == 0.0
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    upsamplers = [p for name, p in module.net.named_parameters() if name.startswith("upscore")]
    assert upsamplers and not any(id(p) in optimised for p in upsamplers)


def test_sweep_composes_each_model():
    names = {_compose([f"model={name}"]).model.net.name for name in ("fcn32s", "fcn16s", "fcn8s")}
    assert names == {"fcn32s", "fcn16s", "fcn8s"}


@pytest.mark.parametrize("override,needle", [
    ("model=fcn7s", "fcn7s"),
    ("=5", None),
    ("trainer.max_epochs=[1,", None),
    ("no_such_key=1", "no_such_key"),
])
def test_bad_override_ends_in_one_clear_line(override, needle):
    result = subprocess.run([sys.executable, "-m", "fcnseg.train", override], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    if needle:
        assert needle in lines[0]


def test_unknown_model_name_in_python_is_one_line():
    from fcnseg.errors import ConfigError
    from fcnseg.models import build_fcn

    with pytest.raises(ConfigError) as info:
        build_fcn("fcn4s")
    assert "\n" not in str(info.value) and "fcn8s" in str(info.value)


def test_paper_preset_loader_yields_each_training_image_whole(voc_root):
    """Through the real datamodule: batches of one image at its own size, label intact (no crop, pad or resize)."""
    from hydra.utils import instantiate

    from fcnseg.data.voc import VOCSegmentation

    cfg = _compose(["experiment=paper", f"data.root={voc_root}", "data.datamodule.train_split=train",
                    "data.datamodule.val_split=val", "data.datamodule.num_workers=0",
                    "data.datamodule.pin_memory=false"])
    datamodule = instantiate(cfg.data.datamodule)
    datamodule.setup("fit")
    raw = VOCSegmentation(voc_root, "train")
    sizes = sorted(tuple(raw[i][1].shape) for i in range(len(raw)))
    seen = []
    for images, masks in datamodule.train_dataloader():
        assert images.shape[0] == 1 and images.shape[-2:] == masks.shape[-2:]
        seen.append(tuple(masks.shape[-2:]))
    assert sorted(seen) == sizes and len(set(sizes)) > 1
