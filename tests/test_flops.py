"""FLOP counts behind MFU: counted on the meta device, per resolution."""

from __future__ import annotations

import pytest
import torch

from fastimagenet.flops import TrainFlops, mfu, peak_tflops
from fastimagenet.models import build_model


def test_resnet50_training_flops_match_the_published_count():
    flops = TrainFlops(lambda: build_model("resnet50", 1000))
    # ResNet-50 forward: 4.1 GMACs = 8.2 GFLOPs at 224 px; forward + backward is about 3x that.
    assert flops.per_image(224) == pytest.approx(3 * 8.18e9, rel=0.02)
    assert flops.per_image(112) == pytest.approx(flops.per_image(224) / 4, rel=0.1)  # ~ pixels (+ fixed fc)


def test_mfu_is_reported_only_with_a_known_peak():
    assert peak_tflops(torch.device("cpu"), "fp32", 0.0) is None
    assert peak_tflops(torch.device("cpu"), "fp32", 2.5) == 2.5
    assert mfu(24e9, 1000, None, 1) is None
    assert mfu(24e9, 1000, 100.0, 2) == pytest.approx(24e12 / 200e12)
