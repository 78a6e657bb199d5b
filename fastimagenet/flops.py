"""Model FLOPs utilisation (MFU): the FLOPs a training step needs at the current resolution, divided by what the
devices could do at their peak.

FLOPs are counted, not estimated: one forward + backward of the model on the meta device (no memory, no compute)
under PyTorch's FLOP counter, once per resolution (a multiply-add counts as 2 FLOPs).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense BF16/FP16 tensor-core peaks in TFLOP/s, from the vendors' data sheets (no sparsity).
_PEAK_TFLOPS_16BIT = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "V100": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def peak_tflops(device: torch.device, precision: str, configured: float) -> float | None:
    """Peak TFLOP/s of one device: `runtime.peak_tflops` when set, else the data-sheet figure of a known GPU at
    bf16/fp16; None when unknown (CPU, fp32, an unlisted GPU), and MFU is then not reported."""
    if configured > 0:
        return configured
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_TFLOPS_16BIT.items() if key in name), None)


class TrainFlops:
    """FLOPs of one training image (forward + backward) at a resolution, counted once per resolution."""

    def __init__(self, make_model: Callable[[], nn.Module]):
        self.make_model = make_model
        self._per_resolution: dict[int, float] = {}

    def per_image(self, resolution: int) -> float:
        if resolution not in self._per_resolution:
            with torch.device("meta"):
                # eval(): training-mode BatchNorm rejects a batch of one at 1x1 (e.g. resnet18 at 32 px); the
                # counted convolutions and matmuls are the same in both modes.
                model = self.make_model().eval()
                images = torch.empty(1, 3, resolution, resolution)
            with FlopCounterMode(display=False) as counter:
                model(images).sum().backward()
            self._per_resolution[resolution] = float(counter.get_total_flops())
        return self._per_resolution[resolution]


def mfu(flops_per_image: float, images_per_s: float, peak: float | None, devices: int) -> float | None:
    """Fraction of the devices' peak that the training step achieved (None when the peak is unknown)."""
    if peak is None:
        return None
    return flops_per_image * images_per_s / (peak * 1e12 * devices)
