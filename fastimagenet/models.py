"""Model zoo: torchvision's ImageNet ResNets and small-image variants (3x3 stem, no max-pool, any width).

ImageNet archs are torchvision's own classes, so an exported state_dict loads into `torchvision.models.resnet50()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, Bottleneck

from fastimagenet.blurpool import MIN_IN_CHANNELS, apply_blurpool
from fastimagenet.common.errors import UserError

# name -> (block, blocks per stage, small-image stem)
ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), False),
    "resnet34": (BasicBlock, (3, 4, 6, 3), False),
    "resnet50": (Bottleneck, (3, 4, 6, 3), False),
    "resnet101": (Bottleneck, (3, 4, 23, 3), False),
    "resnet10_small": (BasicBlock, (1, 1, 1, 1), True),
    "resnet18_small": (BasicBlock, (2, 2, 2, 2), True),
}

# ImageNet channel statistics on the 0..255 scale: the loop normalises uint8 batches on the device.
MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


# PyTorch's CPU convolutions (oneDNN) compute the weight gradient of a strided 1x1 convolution on channels-last input
# through a scratch copy of the input that they overrun when it has fewer channels than their vector block (16 with
# AVX-512, 8 with AVX2): the process crashes, or the gradient is silently wrong (oneDNN issue 6035). The narrow
# *_small models have such layers: the shortcuts of their strided blocks at widths below 16.
NARROW_SHORTCUT_CHANNELS = 16


class SubsampledPointwiseConv2d(nn.Conv2d):
    """A strided 1x1 convolution computed as the same convolution at stride 1 on every stride-th pixel: the same
    parameters (and state_dict keys) and the same result, through kernels that have no strided 1x1 case."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.stride
        return F.conv2d(x[:, :, ::rows, ::cols], self.weight, self.bias, groups=self.groups)


def _subsample_narrow_shortcuts(model: nn.Module) -> None:
    for block in model.modules():
        if not isinstance(block, (BasicBlock, Bottleneck)) or block.downsample is None:
            continue
        conv = block.downsample[0]
        if max(conv.stride) > 1 and conv.in_channels < NARROW_SHORTCUT_CHANNELS:
            subsampled = SubsampledPointwiseConv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride,
                                                   bias=conv.bias is not None)
            subsampled.load_state_dict(conv.state_dict())  # keeps the model's initialisation
            block.downsample[0] = subsampled


class SmallImageResNet(resnet.ResNet):
    """torchvision's ResNet with a 3x3 stride-1 stem and no max-pool (for 28-64 px images), at any width."""

    def __init__(self, block, layers, num_classes: int, width: int, zero_init_residual: bool):
        super().__init__(block, list(layers), num_classes=num_classes, zero_init_residual=zero_init_residual)
        # Rebuild the stages at the requested width (torchvision hard-codes 64..512).
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        _init_weights(self, zero_init_residual)
        _subsample_narrow_shortcuts(self)


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def build_model(arch: str, num_classes: int, width: int = 64, zero_init_residual: bool = True,
                blurpool: bool = False) -> nn.Module:
    block, layers, small = ARCHS[arch]
    if small:
        model = SmallImageResNet(block, layers, num_classes, width, zero_init_residual)
    elif width != 64:
        raise UserError(f"config: 'model.width' applies to the *_small archs only; {arch} has width 64")
    else:
        model = resnet.ResNet(block, list(layers), num_classes=num_classes, zero_init_residual=zero_init_residual)
    if blurpool and apply_blurpool(model) == 0:
        raise UserError(f"config: model.blurpool=true but {arch} at width {width} has no strided convolution with "
                        f">= {MIN_IN_CHANNELS} input channels to blur (use a larger model.width)")
    return model


def check_model_options(arch: str, width: int, blurpool: bool) -> None:
    """The checks `build_model` makes, run when the config is loaded: the model is built on the meta device (no
    memory, no compute), so a bad combination is reported before any work starts."""
    with torch.device("meta"):
        build_model(arch, 1, width, blurpool=blurpool)


class Normalized(nn.Module):
    """uint8 NCHW (channels-last) batches -> ImageNet-normalised floats -> `net`. The statistics are buffers, on the
    device once (not a host->device copy per forward), and the normalisation fuses into the compiled graph. Only
    `net` is checkpointed and exported: the buffers are not persistent."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(MEAN_255).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD_255).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.float() - self.mean) / self.std)
