"""`fastimagenet inspect FILE.beton`: what a .beton holds, and (with verify) whether every record decodes.

Works on any FFCV file with an RGB image field; the class names come from the sidecar `convert` writes, when present.
The tables are always checked; verification compares each record with its stored checksum and decodes it
(dataset_tools/beton_file.py: JPEGs with OpenCV, the same libjpeg family FFCV uses), without building a loader.
"""

from __future__ import annotations

import os

import numpy as np

from fastimagenet.dataset_tools.beton_file import Beton
from fastimagenet.dataset_tools.convert import read_sidecar, sidecar_path
from fastimagenet.dataset_tools.record_sums import stored_sums

_MODES = {0: "jpg", 1: "raw"}  # FFCV's per-record storage of an RGB image


def _stats(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    return {"min": int(values.min()), "mean": round(float(values.mean()), 1), "max": int(values.max())}


def inspect_beton(path: str | os.PathLike, verify: bool = False, max_problems: int = 20) -> dict:
    beton = Beton(path)
    images, labels = beton.images, beton.labels
    meta = read_sidecar(beton.path) if sidecar_path(beton.path).exists() else None
    record_bytes = beton.record_bytes
    modes = {_MODES.get(int(m), str(m)): int(n) for m, n in zip(*np.unique(images["mode"], return_counts=True))}
    info = {
        "file": str(beton.path),
        "bytes": beton.path.stat().st_size,
        "images": int(beton.reader.num_samples),
        "fields": {name: type(handler).__name__ for name, handler in beton.reader.handlers.items()},
        "write_modes": modes,
        "width": _stats(images["width"]),
        "height": _stats(images["height"]),
        "record_bytes": _stats(record_bytes),
        "labels": len(np.unique(labels)),
    }
    if meta is not None:
        info["classes"] = len(meta["classes"])
        info["class_names"] = meta["classes"][:5] + (["..."] if len(meta["classes"]) > 5 else [])
        info["settings"] = {key: meta.get(key) for key in ("write_mode", "max_resolution", "jpeg_quality",
                                                           "source", "subset")}
        info["skipped_at_convert"] = len(meta.get("skipped", {}))
    stored = stored_sums(meta, len(images))
    info["checksums"] = "stored" if stored is not None else "none (records are checked for decoding only)"
    damaged, problems = beton.table_problems(len(meta["classes"]) if meta is not None else None)
    if damaged:
        info["damaged_records"] = damaged
    if verify and not damaged:  # records decode only once the tables are sound
        problems = beton.problems(max_problems, stored)
    if verify or damaged:
        info["verified"] = not problems
        info["problems"] = {where if where == "file" else f"record {where}": why for where, why in problems.items()}
    return info


def format_inspection(info: dict) -> str:
    lines = [f"{info['file']}: {info['images']} images, {info['bytes'] / 2**20:.1f} MiB"]
    for key in ("fields", "write_modes", "width", "height", "record_bytes", "labels", "classes", "class_names",
                "settings", "skipped_at_convert", "checksums", "damaged_records", "verified", "problems"):
        if key in info:
            lines.append(f"  {key}: {info[key]}")
    return "\n".join(lines)
