"""What the memory tests run in a fresh process (`python -c`, from the repository root): a file refused by every
decode path, and how far a phase raises the peak resident memory."""

from __future__ import annotations

import re

from fastimagenet.dataset_tools.convert import load_rgb
from fastimagenet.dataset_tools.verify import inspect_image
from fastimagenet.loaders.augment import center_crop_box
from fastimagenet.loaders.image_decode import decode_crop


def refused_everywhere(path: str) -> None:
    """Verification, convert's decode and the torchvision decode (training and evaluation boxes) all refuse `path`;
    SystemExit names it otherwise."""
    assert inspect_image(path).problem is not None, path
    for box_of in (lambda w, h: (0, 0, w, h), lambda w, h: center_crop_box(w, h, 0.875)):
        for attempt in (lambda: load_rgb(path, 512), lambda: decode_crop(path, box_of, 64, False)):
            try:
                attempt()
            except Exception:  # noqa: BLE001 - refused, as it must be
                continue
            raise SystemExit(f"{path} was decoded")


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(field + r":\s+(\d+)", status.read()).group(1))


def peak_growth(phase) -> int:
    """MiB by which the peak resident memory rose above the memory in use while `phase()` ran."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # Linux: the peak (VmHWM) starts again from the memory in use now
    start = _kib("VmRSS")
    phase()
    return (_kib("VmHWM") - start) // 1024
