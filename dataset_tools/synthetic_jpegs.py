"""An ImageNet-like JPEG folder made on the spot: photo-sized images whose class shows in colour and texture,
so a small model can learn it and a decoder does realistic work (smooth content, q90, ~400x400)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _image(rng: np.random.Generator, label: int, classes: int, width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = np.pi * label / classes
    freq = 0.02 + 0.05 * rng.random()
    stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) * freq * 2 * np.pi + rng.uniform(0, 6.3))
    hue = np.array([np.cos(2 * np.pi * label / classes), np.cos(2 * np.pi * (label / classes + 1 / 3)),
                    np.cos(2 * np.pi * (label / classes + 2 / 3))], dtype=np.float32)
    base = 128 + 60 * hue[None, None, :] + 50 * stripes[..., None]
    blob_y, blob_x = rng.uniform(0, height), rng.uniform(0, width)
    blob = np.exp(-((x - blob_x) ** 2 + (y - blob_y) ** 2) / (2 * (0.2 * min(width, height)) ** 2))
    noise = rng.normal(0, 8, (height, width, 3))
    return np.clip(base + 40 * blob[..., None] + noise, 0, 255).astype(np.uint8)


def make_jpeg_folder(root: Path, classes: int = 10, per_class: int = 20, size: int = 400, quality: int = 90,
                     seed: int = 0) -> Path:
    """Write root/class_XX/img_YYYY.jpg. Sizes vary by +-25% around `size`, like photos do."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        class_dir = Path(root) / f"class_{label:02d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = (int(size * rng.uniform(0.75, 1.25)) for _ in range(2))
            Image.fromarray(_image(rng, label, classes, width, height)).save(
                class_dir / f"img_{i:04d}.jpg", quality=quality)
    return Path(root)
