"""Loading weights: pytorch-fcn reference checkpoints, staged init from a coarser FCN, VGG16 backbones, bad files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fcnseg.errors import CheckpointError
from fcnseg.models import build_fcn, init_from_coarser, load_reference_weights
from fcnseg.models.fcn import bilinear_kernel
from fcnseg.models.weights import load_vgg16_backbone

TINY = 0.0625


def _randomised(name: str, seed: int, num_classes: int = 3) -> nn.Module:
    """A tiny FCN with every parameter (scores and upsamplers included) random, so outputs depend on all of them."""
    torch.manual_seed(seed)
    model = build_fcn(name, num_classes=num_classes, width=TINY).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


def _output(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model.eval()(torch.randn(1, 3, 40, 52))


def _assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# --- load_reference_weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
def test_reference_state_dict_round_trips_through_a_file(name: str, tmp_path: Path) -> None:
    source = _randomised(name, seed=1)
    path = tmp_path / f"{name}.pth"
    torch.save(source.state_dict(), path)

    target = build_fcn(name, num_classes=3, width=TINY)
    assert not torch.equal(_output(target), _output(source))
    assert load_reference_weights(target, path) is target
    assert torch.equal(_output(target), _output(source))


def test_pytorch_fcn_training_checkpoint_is_accepted(tmp_path: Path) -> None:
    source = _randomised("fcn8s", seed=2)
    optimiser = torch.optim.SGD(source.parameters(), lr=1e-10, momentum=0.99)
    path = tmp_path / "checkpoint.pth.tar"
    # The layout pytorch-fcn's trainer writes.
    torch.save(
        {
            "epoch": 3,
            "iteration": 1000,
            "arch": "FCN8s",
            "optim_state_dict": optimiser.state_dict(),
            "model_state_dict": source.state_dict(),
            "best_mean_iu": 0.62,
        },
        path,
    )
    target = load_reference_weights(build_fcn("fcn8s", num_classes=3, width=TINY), path)
    assert torch.equal(_output(target), _output(source))


def test_reference_layout_with_width_one_shapes_is_accepted() -> None:
    # pytorch-fcn's FCN8s attributes and shapes (upsamplers without bias), as meta tensors: no memory needed.
    shapes = {f"conv{b}_{i}": None for b, n in [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)] for i in range(1, n + 1)}
    channels = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
    state: dict[str, torch.Tensor] = {}
    cin = 3
    for layer in shapes:
        cout = channels[int(layer[4])]
        state[f"{layer}.weight"] = torch.empty(cout, cin, 3, 3, device="meta")
        state[f"{layer}.bias"] = torch.empty(cout, device="meta")
        cin = cout
    for layer, shape in {
        "fc6": (4096, 512, 7, 7), "fc7": (4096, 4096, 1, 1),
        "score_fr": (21, 4096, 1, 1), "score_pool3": (21, 256, 1, 1), "score_pool4": (21, 512, 1, 1),
    }.items():  # fmt: skip
        state[f"{layer}.weight"] = torch.empty(shape, device="meta")
        state[f"{layer}.bias"] = torch.empty(shape[0], device="meta")
    for layer, k in {"upscore2": 4, "upscore8": 16, "upscore_pool4": 4}.items():
        state[f"{layer}.weight"] = torch.empty(21, 21, k, k, device="meta")

    with torch.device("meta"):
        model = build_fcn("fcn8s", num_classes=21, width=1.0)
    load_reference_weights(model, state)  # every key and shape matches

    state["upscore2.bias"] = torch.empty(21, device="meta")
    with pytest.raises(CheckpointError) as info:
        load_reference_weights(model, state)
    _assert_one_line(info, "upscore2.bias")


def test_fcn16s_checkpoint_into_fcn8s_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fcn16s.pth"
    torch.save(_randomised("fcn16s", seed=3).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_reference_weights(build_fcn("fcn8s", num_classes=3, width=TINY), path)
    _assert_one_line(info, str(path), "score_pool3")


def test_fcn8s_checkpoint_into_fcn16s_is_refused() -> None:
    with pytest.raises(CheckpointError) as info:
        load_reference_weights(build_fcn("fcn16s", num_classes=3, width=TINY), _randomised("fcn8s", 4).state_dict())
    _assert_one_line(info, "upscore16.weight")


def test_other_class_count_is_refused() -> None:
    with pytest.raises(CheckpointError) as info:
        load_reference_weights(build_fcn("fcn32s", num_classes=21, width=TINY), _randomised("fcn32s", 5).state_dict())
    _assert_one_line(info, "score_fr.weight", "num_classes")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError) as info:
        load_reference_weights(build_fcn("fcn32s", num_classes=3, width=TINY), path)
    _assert_one_line(info, str(path))


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"PK\x03\x04 truncated zip"])
def test_corrupt_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_reference_weights(build_fcn("fcn32s", num_classes=3, width=TINY), path)
    _assert_one_line(info, str(path))


class _RunsCodeWhenUnpickled:
    """A pickle payload that would create a directory if the loader executed arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = dict(_randomised("fcn32s", seed=6).state_dict())
    state["payload"] = _RunsCodeWhenUnpickled(marker)
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_reference_weights(build_fcn("fcn32s", num_classes=3, width=TINY), path)
    _assert_one_line(info, str(path))
    assert not marker.exists()


def test_file_without_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(CheckpointError) as info:
        load_reference_weights(build_fcn("fcn32s", num_classes=3, width=TINY), path)
    _assert_one_line(info, str(path), "list")


# --- init_from_coarser (staged training) ------------------------------------------------------------------------


def _backbone_and_score_fr_keys(model: nn.Module) -> set[str]:
    return {key for key in model.state_dict() if key.split(".")[0].startswith(("conv", "fc6", "fc7", "score_fr"))}


def _check_fcn16s_from_fcn32s(copied: list[str], fcn16s: nn.Module, fcn32s: nn.Module) -> None:
    expected = _backbone_and_score_fr_keys(fcn16s)
    assert len(expected) == 2 * 16  # 13 convs, fc6, fc7, score_fr
    assert set(copied) == expected
    source, target = fcn32s.state_dict(), fcn16s.state_dict()
    for key in expected:
        assert torch.equal(target[key], source[key]), key
    # What FCN-32s lacks keeps its initialisation: zero pool4 scores, bilinear upsamplers.
    assert torch.count_nonzero(fcn16s.score_pool4.weight) == 0 and torch.count_nonzero(fcn16s.score_pool4.bias) == 0
    assert torch.equal(fcn16s.upscore2.weight, bilinear_kernel(3, 4))
    assert torch.equal(fcn16s.upscore16.weight, bilinear_kernel(3, 32))


def test_fcn16s_from_fcn32s_state_dict() -> None:
    fcn32s = _randomised("fcn32s", seed=7)
    fcn16s = build_fcn("fcn16s", num_classes=3, width=TINY)
    copied = init_from_coarser(fcn16s, fcn32s.state_dict())
    _check_fcn16s_from_fcn32s(copied, fcn16s, fcn32s)


def test_fcn16s_from_lightning_checkpoint_file(tmp_path: Path) -> None:
    fcn32s = _randomised("fcn32s", seed=8)
    path = tmp_path / "epoch=9.ckpt"
    torch.save(
        {
            "epoch": 9,
            "global_step": 100,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"net.{key}": value for key, value in fcn32s.state_dict().items()}
            | {"criterion.weight": torch.ones(3)},  # another submodule of the LightningModule: ignored
            "hyper_parameters": {"lr": 1e-4, "num_classes": 3},
        },
        path,
    )
    fcn16s = build_fcn("fcn16s", num_classes=3, width=TINY)
    copied = init_from_coarser(fcn16s, path)
    _check_fcn16s_from_fcn32s(copied, fcn16s, fcn32s)


def test_fcn8s_from_compiled_fcn16s_copies_the_pool4_skip() -> None:
    fcn16s = _randomised("fcn16s", seed=9)
    state = {f"_orig_mod.{key}": value for key, value in fcn16s.state_dict().items()}  # torch.compile'd net
    fcn8s = build_fcn("fcn8s", num_classes=3, width=TINY)
    copied = set(init_from_coarser(fcn8s, state))
    assert copied == _backbone_and_score_fr_keys(fcn8s) | {"score_pool4.weight", "score_pool4.bias", "upscore2.weight"}
    assert torch.equal(fcn8s.score_pool4.weight, fcn16s.score_pool4.weight)
    assert torch.count_nonzero(fcn8s.score_pool3.weight) == 0


def test_init_from_unrelated_weights_is_refused() -> None:
    with pytest.raises(CheckpointError) as info:
        init_from_coarser(build_fcn("fcn16s", num_classes=3, width=TINY), {"encoder.weight": torch.zeros(2)})
    _assert_one_line(info, "conv1_1")


# --- load_vgg16_backbone ----------------------------------------------------------------------------------------


def test_vgg16_backbone_with_wrong_layout_names_the_missing_key() -> None:
    model = build_fcn("fcn8s", num_classes=3, width=TINY)
    with pytest.raises(CheckpointError) as info:  # an FCN state dict is not a torchvision VGG16 one
        load_vgg16_backbone(model, _randomised("fcn8s", seed=10).state_dict())
    _assert_one_line(info, "features.0.weight")

    # vgg16_bn layout: features.1 is BatchNorm, the second conv is features.3, so features.2 is missing.
    bn_layout = {
        "features.0.weight": torch.zeros(4, 3, 3, 3), "features.0.bias": torch.zeros(4),
        "features.1.weight": torch.ones(4), "features.1.bias": torch.zeros(4),
        "features.3.weight": torch.zeros(4, 4, 3, 3), "features.3.bias": torch.zeros(4),
    }  # fmt: skip
    with pytest.raises(CheckpointError) as info:
        load_vgg16_backbone(model, bn_layout)
    _assert_one_line(info, "features.2.weight")


def test_vgg16_backbone_with_wrong_shapes_is_refused() -> None:
    model = build_fcn("fcn8s", num_classes=3, width=TINY)  # conv1_1 has 4 channels; VGG16's has 64
    state = {"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64)}
    with pytest.raises(CheckpointError) as info:
        load_vgg16_backbone(model, state)
    _assert_one_line(info, "features.0.weight", "conv1_1.weight")
