"""Models and optimizer parameter groups."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from fastimagenet.common.errors import UserError
from fastimagenet.config import load_config
from fastimagenet.models import ARCHS, Normalized, SubsampledPointwiseConv2d, build_model
from fastimagenet.optim import param_groups


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_imagenet_archs_are_torchvision_compatible(arch):
    import torchvision

    model = build_model(arch, num_classes=10)
    reference = getattr(torchvision.models, arch)(num_classes=10)
    reference.load_state_dict(model.state_dict())  # same keys and shapes


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.endswith("_small")])
def test_small_image_archs_keep_resolution_in_the_stem(arch):
    model = build_model(arch, num_classes=7, width=8).eval()
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.stride == (1, 1)
    assert model.conv1.out_channels == 8
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 7)


def test_zero_init_residual_zeroes_the_last_bn_of_each_block():
    model = build_model("resnet18", num_classes=10)
    assert all(not block.bn2.weight.detach().any() for block in model.layer1)


def test_width_is_only_for_small_archs_and_unknown_arch_is_an_error():
    with pytest.raises(UserError, match="'model.width' applies to the \\*_small archs"):
        build_model("resnet18", 10, width=32)
    with pytest.raises(UserError, match="'model.arch' must be one of"):
        load_config(None, ["model.arch=resnet5O"])


def test_no_weight_decay_on_norm_layers_and_biases():
    model = build_model("resnet10_small", num_classes=10, width=8)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0
    decayed = {id(p) for p in decay["params"]}
    assert id(model.conv1.weight) in decayed and id(model.fc.weight) in decayed
    assert id(model.bn1.weight) not in decayed and id(model.fc.bias) not in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_normalize_keeps_channels_last():
    images = torch.full((2, 32, 32, 3), 124, dtype=torch.uint8).permute(0, 3, 1, 2)
    out = Normalized(nn.Identity())(images)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert abs(float(out[0, 0, 0, 0])) < 0.01  # 124 ~ the red channel mean


def test_narrow_shortcuts_run_unstrided_with_the_same_result():
    """A strided 1x1 convolution with < 16 input channels on channels-last input is where PyTorch's CPU kernels
    crash or return a wrong weight gradient: narrow models compute those shortcuts unstrided, to the same result."""
    model = build_model("resnet10_small", 4, width=8)
    shortcuts = [block.downsample[0] for block in model.modules()
                 if isinstance(block, BasicBlock) and block.downsample is not None]
    assert [type(conv) for conv in shortcuts] == [SubsampledPointwiseConv2d, nn.Conv2d, nn.Conv2d]  # 8, 16, 32 in
    plain = nn.Conv2d(8, 16, 1, stride=2, bias=False)
    plain.load_state_dict(shortcuts[0].state_dict())  # the same keys
    images = torch.randn(4, 8, 47, 47).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(4, 16, 24, 24)

    def gradients(conv):
        inputs = images.clone().requires_grad_()
        conv.zero_grad()
        conv(inputs).backward(upstream)
        return conv.weight.grad.clone(), inputs.grad

    with torch.backends.mkldnn.flags(enabled=False):  # the reference kernels
        expected = gradients(plain)
    for got, want in zip(gradients(shortcuts[0]), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)  # (sums of 2304 products, reordered)


def test_a_narrow_channels_last_model_trains_at_changing_resolutions():
    """The shape that crashed (width 8, channels-last, 32 then 48 px): in a process of its own, so a crash is
    reported here rather than ending the test run."""
    step = textwrap.dedent("""
        import torch
        from fastimagenet.models import build_model
        model = build_model("resnet10_small", 4, width=8).to(memory_format=torch.channels_last)
        for size in (32, 48, 64):
            images = torch.randn(16, 3, size, size).contiguous(memory_format=torch.channels_last)
            model(images).sum().backward()
        print("trained")
    """)
    done = subprocess.run([sys.executable, "-c", step], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "trained" in done.stdout, f"rc {done.returncode}: {done.stderr[-2000:]}"
