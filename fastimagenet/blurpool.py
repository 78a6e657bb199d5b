"""BlurPool: anti-aliased downsampling. Every strided convolution first low-pass filters its input with a fixed
3x3 binomial kernel, so the stride no longer aliases high frequencies into the features it keeps (Zhang, "Making
Convolutional Networks Shift-Invariant Again", 2019; used by FFCV's ImageNet speedruns).

The blurred convolution is a subclass of nn.Conv2d with the same parameters and a non-persistent filter, so a
model's state_dict keeps torchvision's keys and an exported checkpoint still loads into a plain torchvision ResNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The stem sees raw RGB (3 channels): blurring the image itself only throws away resolution, so only layers with
# at least this many input channels (the stages, not the stem) are blurred.
MIN_IN_CHANNELS = 16


def _binomial_filter(channels: int) -> torch.Tensor:
    """[1, 2, 1] x [1, 2, 1] / 16 per channel: sums to 1, so flat regions pass unchanged."""
    row = torch.tensor([1.0, 2.0, 1.0])
    kernel = torch.outer(row, row) / 16
    return kernel.expand(channels, 1, 3, 3).clone()


class BlurPoolConv2d(nn.Conv2d):
    """A strided convolution applied to a blurred copy of its input (depthwise 3x3, stride 1, same size)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("blur_filter", _binomial_filter(self.in_channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur_filter.to(x.dtype), padding=1, groups=self.in_channels)
        return super().forward(blurred)


def _blurred_copy(conv: nn.Conv2d) -> BlurPoolConv2d:
    new = BlurPoolConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode)
    new.load_state_dict(conv.state_dict())  # keeps the model's initialisation
    return new


def apply_blurpool(model: nn.Module) -> int:
    """Replace, in place, every strided Conv2d with >= MIN_IN_CHANNELS inputs by its blurred twin.
    Returns how many were replaced (a model with none is a configuration mistake worth noticing)."""
    replaced = 0
    for name, child in model.named_children():
        if type(child) is nn.Conv2d and max(child.stride) > 1 and child.in_channels >= MIN_IN_CHANNELS:
            setattr(model, name, _blurred_copy(child))
            replaced += 1
        else:
            replaced += apply_blurpool(child)
    return replaced
