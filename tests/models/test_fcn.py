"""FCN-32s/16s/8s: the paper's parameter counts, layer names, shapes, FC->conv conversion and bilinear upsampling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fcnseg.errors import ConfigError
from fcnseg.models import FCN_NAMES, build_fcn
from fcnseg.models.fcn import bilinear_kernel

TINY = 0.0625  # channels 4, 8, 16, 32, 32, fc 256: fast on CPU, every code path the same as width 1


def _count_without_upsampling(model: nn.Module) -> int:
    return sum(
        p.numel()
        for module in model.modules()
        if not isinstance(module, nn.ConvTranspose2d)
        for p in module.parameters(recurse=False)
    )


# The paper's nets (and wkentaro/pytorch-fcn, whose state dicts must load 1:1): names and width-1 shapes.
_VGG_SHAPES: dict[str, tuple[int, ...]] = {}
for _name, _cin, _cout in [
    ("conv1_1", 3, 64), ("conv1_2", 64, 64),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
    ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512),
]:  # fmt: skip
    _VGG_SHAPES[f"{_name}.weight"] = (_cout, _cin, 3, 3)
    _VGG_SHAPES[f"{_name}.bias"] = (_cout,)
_VGG_SHAPES |= {
    "fc6.weight": (4096, 512, 7, 7), "fc6.bias": (4096,),
    "fc7.weight": (4096, 4096, 1, 1), "fc7.bias": (4096,),
    "score_fr.weight": (21, 4096, 1, 1), "score_fr.bias": (21,),
}  # fmt: skip
_POOL4 = {"score_pool4.weight": (21, 512, 1, 1), "score_pool4.bias": (21,)}
_POOL3 = {"score_pool3.weight": (21, 256, 1, 1), "score_pool3.bias": (21,)}
# Upsampling layers have no bias, as in the Caffe nets and pytorch-fcn.
REFERENCE_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "fcn32s": _VGG_SHAPES | {"upscore.weight": (21, 21, 64, 64)},
    "fcn16s": _VGG_SHAPES | _POOL4 | {"upscore2.weight": (21, 21, 4, 4), "upscore16.weight": (21, 21, 32, 32)},
    "fcn8s": _VGG_SHAPES
    | _POOL4
    | _POOL3
    | {"upscore2.weight": (21, 21, 4, 4), "upscore_pool4.weight": (21, 21, 4, 4), "upscore8.weight": (21, 21, 16, 16)},
}
REFERENCE_SHAPES["fcn8s_atonce"] = REFERENCE_SHAPES["fcn8s"]


@pytest.mark.parametrize(
    ("name", "expected"), [("fcn8s", 134_362_751), ("fcn16s", 134_357_354), ("fcn32s", 134_346_581)]
)
def test_parameter_count_matches_paper(name: str, expected: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_fcn(name, num_classes=21, width=1.0)
    assert _count_without_upsampling(model) == expected


@pytest.mark.parametrize("name", FCN_NAMES)
def test_layer_names_and_shapes_are_the_papers(name: str) -> None:
    with torch.device("meta"):
        model = build_fcn(name, num_classes=21, width=1.0)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == REFERENCE_SHAPES[name]


@pytest.mark.parametrize("size", [(1, 1), (97, 131), (375, 500)])
@pytest.mark.parametrize("name", FCN_NAMES)
def test_output_shape_equals_input_shape(name: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = build_fcn(name, num_classes=21, width=TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 21, *size)
    assert out.is_contiguous()


def test_batch_and_num_classes_are_kept() -> None:
    model = build_fcn("fcn8s", num_classes=5, width=TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 33, 17))
    assert out.shape == (2, 5, 33, 17)


@pytest.mark.parametrize("name", FCN_NAMES)
def test_untrained_net_outputs_zero_scores(name: str) -> None:
    torch.manual_seed(0)
    model = build_fcn(name, num_classes=21, width=TINY).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        _, _, fc7 = model.encode(x)
        out = model(x)
    assert fc7.abs().sum() > 0  # the backbone is randomly initialised, not zero: the zeros come from the scores
    assert torch.count_nonzero(out) == 0
    for layer_name in ("score_fr", "score_pool4", "score_pool3"):
        layer = getattr(model, layer_name, None)
        if layer is not None:
            assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


def test_vgg_layers_use_torchvision_init_not_pytorch_default() -> None:
    # kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k)); PyTorch's default is ~3x smaller here.
    torch.manual_seed(0)
    model = build_fcn("fcn32s", width=0.25)
    weight = model.conv3_2.weight
    expected_std = (2 / (weight.shape[0] * 9)) ** 0.5
    assert weight.std().item() == pytest.approx(expected_std, rel=0.1)
    assert torch.count_nonzero(model.conv3_2.bias) == 0


# --- bilinear upsampling ---------------------------------------------------------------------------------------

UPSAMPLERS = [
    ("fcn8s", "upscore2", 2),
    ("fcn8s", "upscore_pool4", 2),
    ("fcn8s", "upscore8", 8),
    ("fcn16s", "upscore2", 2),
    ("fcn16s", "upscore16", 16),
    ("fcn32s", "upscore", 32),
]


@pytest.mark.parametrize(("name", "layer_name", "factor"), UPSAMPLERS)
def test_upsampling_is_bilinear_in_the_interior(name: str, layer_name: str, factor: int) -> None:
    num_classes = 3
    layer = getattr(build_fcn(name, num_classes=num_classes, width=TINY), layer_name).double()
    assert layer.kernel_size == (2 * factor, 2 * factor) and layer.stride == (factor, factor)

    torch.manual_seed(0)
    x = torch.randn(1, num_classes, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        up = layer(x)
    expected = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    # Output pixel p of the transposed conv (tent centred at f - 0.5, half-width f) sits at source coordinate
    # (p + 0.5) / f - 1, interpolate's pixel o at (o + 0.5) / f - 0.5: p = o + f / 2. Away from the borders (where
    # interpolate clamps and the transposed conv lacks neighbours) they must agree exactly.
    shift = factor // 2
    lo_h, hi_h, lo_w, hi_w = factor, 5 * factor - factor, factor, 7 * factor - factor
    got = up[:, :, shift + lo_h : shift + hi_h, shift + lo_w : shift + hi_w]
    torch.testing.assert_close(got, expected[:, :, lo_h:hi_h, lo_w:hi_w], rtol=1e-12, atol=1e-12)


def test_bilinear_kernel_is_on_the_class_diagonal_and_separable() -> None:
    weight = bilinear_kernel(4, 4)
    assert weight.shape == (4, 4, 4, 4)
    off_diagonal = weight.clone()
    off_diagonal[range(4), range(4)] = 0
    assert torch.count_nonzero(off_diagonal) == 0
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(weight[2, 2], taps[:, None] * taps[None, :])


@pytest.mark.parametrize("name", FCN_NAMES)
def test_upsampling_is_frozen_by_default_and_learnable_on_request(name: str) -> None:
    frozen = build_fcn(name, num_classes=3, width=TINY)
    learnable = build_fcn(name, num_classes=3, width=TINY, learnable_upsampling=True)
    for model, trainable in ((frozen, False), (learnable, True)):
        upsamplers = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
        assert len(upsamplers) == {"fcn32s": 1, "fcn16s": 2}.get(name, 3)
        for up in upsamplers:
            assert up.bias is None
            assert up.weight.requires_grad is trainable
            torch.testing.assert_close(up.weight, bilinear_kernel(3, up.kernel_size[0]))  # bilinear either way
    assert all(p.requires_grad for n, p in frozen.named_parameters() if not n.startswith("upscore"))


# --- FC -> conv conversion --------------------------------------------------------------------------------------


def test_fc_to_conv_conversion_reproduces_torchvision_vgg16() -> None:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16().eval()  # random init; the layout, not the values, is what is tested
    fcn = build_fcn("fcn32s", width=1.0, backbone_weights=vgg.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)

    with torch.no_grad():
        pool3_ref = vgg.features[:17](x)
        pool4_ref = vgg.features[17:24](pool3_ref)
        pool5_ref = vgg.features[24:](pool4_ref)  # (1, 512, 7, 7)
        fc7_ref = vgg.classifier[:5](torch.flatten(vgg.avgpool(pool5_ref), 1))  # ReLU(fc7), dropout off
        assert fc7_ref.abs().sum() > 0

        # The converted fc6/fc7 on torchvision's 7x7 pool5 give a 1x1 map equal to the classifier's output.
        fc7 = fcn.relu7(fcn.fc7(fcn.relu6(fcn.fc6(pool5_ref.clone()))))
        assert fc7.shape == (1, 4096, 1, 1)
        torch.testing.assert_close(fc7.flatten(1), fc7_ref, rtol=1e-4, atol=1e-5)

        # The whole backbone: with conv1_1's padding of 100 set back to VGG's 1 (the padding shifts the grid by
        # an odd 99 pixels and feeds the pools ReLU(bias) borders, so no position of the padded net matches
        # exactly), the FCN's own encoder reproduces VGG16's pool3, pool4 and fc7.
        fcn.conv1_1.padding = (1, 1)
        pool3, pool4, fc7_own = fcn.encode(x)
    torch.testing.assert_close(pool3, pool3_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pool4, pool4_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fc7_own.flatten(1), fc7_ref, rtol=1e-4, atol=1e-5)


# --- at-once ----------------------------------------------------------------------------------------------------


def test_atonce_scales_pool4_and_pool3() -> None:
    torch.manual_seed(0)
    staged = build_fcn("fcn8s", num_classes=3, width=TINY).double().eval()
    with torch.no_grad():
        for layer, scale in ((staged.score_fr, 1.0), (staged.score_pool4, 1e2), (staged.score_pool3, 1e4)):
            # Large skip weights make the at-once net's scaled skips contribute O(1), so a wrong scale shows.
            layer.weight.normal_(0, scale)
            layer.bias.normal_()
    atonce = build_fcn("fcn8s_atonce", num_classes=3, width=TINY).double().eval()
    atonce.load_state_dict(staged.state_dict())

    expected_net = copy.deepcopy(staged)
    with torch.no_grad():
        expected_net.score_pool4.weight.mul_(0.01)
        expected_net.score_pool3.weight.mul_(1e-4)

    x = torch.randn(1, 3, 70, 90, dtype=torch.float64)
    with torch.no_grad():
        got = atonce(x)
        expected = expected_net(x)
        without_pool3 = copy.deepcopy(expected_net)
        without_pool3.score_pool3.weight.zero_()
        without_pool4 = copy.deepcopy(expected_net)
        without_pool4.score_pool4.weight.zero_()
        # Both skips must visibly contribute, or the comparison below could not catch a wrong scale.
        assert (expected - without_pool3(x)).abs().max() > 1e-2
        assert (expected - without_pool4(x)).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


# --- configuration errors ---------------------------------------------------------------------------------------


def test_unknown_model_name_is_a_one_line_config_error_naming_the_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_fcn("fcn4s")
    message = str(info.value)
    assert "\n" not in message and "fcn4s" in message
    assert all(name in message for name in FCN_NAMES)


@pytest.mark.parametrize("weights", ["imagenet", "/some/vgg16.pth"])
def test_backbone_weights_need_width_one(weights: str) -> None:
    with pytest.raises(ConfigError, match="width") as info:
        build_fcn("fcn8s", width=0.25, backbone_weights=weights)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kwargs"), [{"num_classes": 0}, {"num_classes": 2.5}, {"width": 0}, {"width": -1.0}])
def test_bad_sizes_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        build_fcn("fcn32s", **kwargs)
