"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer & Darrell, CVPR 2015), written out layer by layer.

Layer names follow the paper's Caffe nets and their PyTorch port (wkentaro/pytorch-fcn), so that port's state
dicts load 1:1 (see ``fcnseg.models.weights``). The backbone is VGG16 made fully convolutional: fc6 is a 7x7
convolution, fc7 a 1x1 convolution. ``conv1_1`` pads by 100 so that any input size, down to 1x1, still leaves a
score map after the 7x7 fc6; the crops at the paper's offsets then cut the upsampled scores back to the input.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fcnseg.errors import ConfigError
from fcnseg.models.weights import load_vgg16_backbone

FCN_NAMES: tuple[str, ...] = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")
SCORE_LAYERS: tuple[str, ...] = ("score_fr", "score_pool4", "score_pool3")  # the class-specific 1x1 convolutions


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """Transposed-convolution weight (channels, channels, k, k) doing bilinear upsampling on the class diagonal.

    Same kernel as the Caffe FCN ``surgery.upsample_filt``: a separable tent centred on the kernel.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float64) - center).abs() / factor
    filt = (taps[:, None] * taps[None, :]).float()
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = filt
    return weight


def _crop(h: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """Crop ``h`` at ``offset`` to the spatial size of ``like`` (the Caffe ``Crop`` layer)."""
    return h[:, :, offset : offset + like.size(2), offset : offset + like.size(3)]


class _FCNBase(nn.Module):
    """VGG16 up to fc7, fully convolutional. Subclasses add the score and upsampling layers."""

    def __init__(self, num_classes: int, width: float, learnable_upsampling: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        self.learnable_upsampling = learnable_upsampling
        c1, c2, c3, c4, c5, fc = (max(1, int(c * width)) for c in (64, 128, 256, 512, 512, 4096))

        # conv1
        self.conv1_1 = nn.Conv2d(3, c1, 3, padding=100)
        self.relu1_1 = nn.ReLU(inplace=True)
        self.conv1_2 = nn.Conv2d(c1, c1, 3, padding=1)
        self.relu1_2 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2, stride=2, ceil_mode=True)  # 1/2

        # conv2
        self.conv2_1 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2_1 = nn.ReLU(inplace=True)
        self.conv2_2 = nn.Conv2d(c2, c2, 3, padding=1)
        self.relu2_2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2, stride=2, ceil_mode=True)  # 1/4

        # conv3
        self.conv3_1 = nn.Conv2d(c2, c3, 3, padding=1)
        self.relu3_1 = nn.ReLU(inplace=True)
        self.conv3_2 = nn.Conv2d(c3, c3, 3, padding=1)
        self.relu3_2 = nn.ReLU(inplace=True)
        self.conv3_3 = nn.Conv2d(c3, c3, 3, padding=1)
        self.relu3_3 = nn.ReLU(inplace=True)
        self.pool3 = nn.MaxPool2d(2, stride=2, ceil_mode=True)  # 1/8

        # conv4
        self.conv4_1 = nn.Conv2d(c3, c4, 3, padding=1)
        self.relu4_1 = nn.ReLU(inplace=True)
        self.conv4_2 = nn.Conv2d(c4, c4, 3, padding=1)
        self.relu4_2 = nn.ReLU(inplace=True)
        self.conv4_3 = nn.Conv2d(c4, c4, 3, padding=1)
        self.relu4_3 = nn.ReLU(inplace=True)
        self.pool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)  # 1/16

        # conv5
        self.conv5_1 = nn.Conv2d(c4, c5, 3, padding=1)
        self.relu5_1 = nn.ReLU(inplace=True)
        self.conv5_2 = nn.Conv2d(c5, c5, 3, padding=1)
        self.relu5_2 = nn.ReLU(inplace=True)
        self.conv5_3 = nn.Conv2d(c5, c5, 3, padding=1)
        self.relu5_3 = nn.ReLU(inplace=True)
        self.pool5 = nn.MaxPool2d(2, stride=2, ceil_mode=True)  # 1/32

        # fc6, fc7: VGG's fully connected layers as convolutions. Element-wise dropout, as in Caffe and torchvision.
        self.fc6 = nn.Conv2d(c5, fc, 7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(0.5)

        self.score_fr = nn.Conv2d(fc, num_classes, 1)

    def _init_weights(self) -> None:
        """VGG/fc: torchvision's init (PyTorch's default barely learns). Scores: zero. Upsampling: bilinear."""
        for name, module in self.named_children():
            if isinstance(module, nn.ConvTranspose2d):
                with torch.no_grad():
                    module.weight.copy_(bilinear_kernel(self.num_classes, module.kernel_size[0]))
                module.weight.requires_grad_(self.learnable_upsampling)
            elif isinstance(module, nn.Conv2d):
                if name.startswith("score"):
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def reset_classifier(self) -> None:
        """Score layers (``score_fr``, ``score_pool4``, ``score_pool3``) back to zero and the upsampling
        deconvolutions back to bilinear: where training on a new set of classes starts (fine-tuning)."""
        for module in self.children():
            if isinstance(module, nn.ConvTranspose2d):
                with torch.no_grad():
                    module.weight.copy_(bilinear_kernel(self.num_classes, module.kernel_size[0]))
        for name in SCORE_LAYERS:
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name).weight)
                nn.init.zeros_(getattr(self, name).bias)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (pool3, pool4, fc7 output after dropout)."""
        h = self.relu1_1(self.conv1_1(x))
        h = self.relu1_2(self.conv1_2(h))
        h = self.pool1(h)

        h = self.relu2_1(self.conv2_1(h))
        h = self.relu2_2(self.conv2_2(h))
        h = self.pool2(h)

        h = self.relu3_1(self.conv3_1(h))
        h = self.relu3_2(self.conv3_2(h))
        h = self.relu3_3(self.conv3_3(h))
        pool3 = h = self.pool3(h)  # 1/8

        h = self.relu4_1(self.conv4_1(h))
        h = self.relu4_2(self.conv4_2(h))
        h = self.relu4_3(self.conv4_3(h))
        pool4 = h = self.pool4(h)  # 1/16

        h = self.relu5_1(self.conv5_1(h))
        h = self.relu5_2(self.conv5_2(h))
        h = self.relu5_3(self.conv5_3(h))
        h = self.pool5(h)  # 1/32

        h = self.drop6(self.relu6(self.fc6(h)))
        h = self.drop7(self.relu7(self.fc7(h)))
        return pool3, pool4, h


class FCN32s(_FCNBase):
    """Scores from fc7 only, upsampled 32x in one step."""

    def __init__(self, num_classes: int = 21, width: float = 1.0, learnable_upsampling: bool = False) -> None:
        super().__init__(num_classes, width, learnable_upsampling)
        self.upscore = nn.ConvTranspose2d(num_classes, num_classes, 64, stride=32, bias=False)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h = self.encode(x)
        h = self.upscore(self.score_fr(h))
        return _crop(h, 19, x).contiguous()


class FCN16s(_FCNBase):
    """fc7 scores upsampled 2x, fused with pool4 scores, upsampled 16x."""

    def __init__(self, num_classes: int = 21, width: float = 1.0, learnable_upsampling: bool = False) -> None:
        super().__init__(num_classes, width, learnable_upsampling)
        self.score_pool4 = nn.Conv2d(self.conv4_3.out_channels, num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore16 = nn.ConvTranspose2d(num_classes, num_classes, 32, stride=16, bias=False)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, pool4, h = self.encode(x)
        upscore2 = self.upscore2(self.score_fr(h))  # 1/16
        score_pool4c = _crop(self.score_pool4(pool4), 5, upscore2)
        h = self.upscore16(upscore2 + score_pool4c)
        return _crop(h, 27, x).contiguous()


class FCN8s(_FCNBase):
    """FCN-16s fused once more with pool3 scores, upsampled 8x.

    ``at_once=True`` is the paper's all-at-once variant: pool4 and pool3 are scaled by 0.01 and 0.0001 before
    scoring, so the skips start small and the net can be trained directly from VGG16 instead of in stages.
    """

    def __init__(
        self, num_classes: int = 21, width: float = 1.0, learnable_upsampling: bool = False, at_once: bool = False
    ) -> None:
        super().__init__(num_classes, width, learnable_upsampling)
        self.at_once = at_once
        self.score_pool3 = nn.Conv2d(self.conv3_3.out_channels, num_classes, 1)
        self.score_pool4 = nn.Conv2d(self.conv4_3.out_channels, num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool3, pool4, h = self.encode(x)
        if self.at_once:
            pool3, pool4 = pool3 * 0.0001, pool4 * 0.01
        upscore2 = self.upscore2(self.score_fr(h))  # 1/16
        score_pool4c = _crop(self.score_pool4(pool4), 5, upscore2)
        upscore_pool4 = self.upscore_pool4(upscore2 + score_pool4c)  # 1/8
        score_pool3c = _crop(self.score_pool3(pool3), 9, upscore_pool4)
        h = self.upscore8(upscore_pool4 + score_pool3c)
        return _crop(h, 31, x).contiguous()


def build_fcn(
    name: str,
    num_classes: int = 21,
    width: float = 1.0,
    backbone_weights: str | os.PathLike | None = None,
    learnable_upsampling: bool = False,
) -> nn.Module:
    """Build an FCN by name (one of ``FCN_NAMES``).

    ``width`` scales every VGG/fc channel count (1.0 is the paper). ``backbone_weights``: None (random init, as
    torchvision initialises VGG), ``"imagenet"`` (torchvision's VGG16 IMAGENET1K_V1, downloaded once) or the path
    of a torchvision-layout VGG16 state dict; fc6/fc7 receive its classifier weights reshaped to convolutions.
    """
    if name not in FCN_NAMES:
        raise ConfigError(f"unknown model name {name!r}; choose one of {', '.join(FCN_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not width > 0:
        raise ConfigError(f"width must be a positive number, got {width!r}")
    if backbone_weights is not None and width != 1:
        raise ConfigError(
            f"backbone_weights={str(backbone_weights)!r} needs width=1 (VGG16's channel counts), got width={width}; "
            "set width to 1.0 or backbone_weights to null"
        )

    if name == "fcn32s":
        model: _FCNBase = FCN32s(num_classes, width, learnable_upsampling)
    elif name == "fcn16s":
        model = FCN16s(num_classes, width, learnable_upsampling)
    else:
        model = FCN8s(num_classes, width, learnable_upsampling, at_once=name == "fcn8s_atonce")

    if backbone_weights is not None:
        load_vgg16_backbone(model, backbone_weights)
    return model


__all__ = ["FCN_NAMES", "FCN8s", "FCN16s", "FCN32s", "bilinear_kernel", "build_fcn"]
