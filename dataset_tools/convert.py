"""ImageFolder -> FFCV .beton: `fastimagenet convert`.

- The class -> index map comes from the train split (sorted folder names, as every backend uses) and is written in a
  JSON sidecar beside each file (`train.beton.json`), so val labels match train labels and the loader can name them.
- Every image is decoded by its content (a PNG named .JPEG is still a PNG), converted to RGB (CMYK, grayscale,
  palette, alpha) and scaled down so its longer side is at most `max_resolution` (JPEGs are scaled in the DCT domain
  while decoding, which is most of the speed on large photos). EXIF orientation is ignored, as torchvision's
  ImageFolder and the other backends ignore it: a .beton holds the pixels every backend reads.
- The files kept are those every backend keeps (dataset_tools/verify.py, the same cached verification the folder
  loaders use); the others are a counted, reported skip (or an error with `strict`). A file that fails anyway (changed
  since): FFCV's writer hangs if a worker raises, so it becomes a placeholder plus a line in a failure log, and the
  file is written again without the failures: only such datasets pay for a second pass.
- Only what FFCV's decoders can decode is stored: FFCV 1.0.2 aborts the whole process (an OpenCV assertion in resize,
  from `get_center_crop` in ffcv/fields/rgb_image.py taking int(crop_ratio * shorter side) = 0 pixels) on images a
  pixel or so thin, so an image whose shorter side is below MIN_STORED_SIDE (after the max_resolution scaling: a
  3000x6 sliver becomes 512x1) has that side stretched to MIN_STORED_SIDE pixels, the longer side kept.
- Output goes to a hidden temporary file in the destination's directory and is renamed over the destination only
  when complete; an interrupted convert leaves no destination and a re-run starts afresh.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools.beton_file import Beton
from fastimagenet.dataset_tools.image_rules import MIN_STORED_SIDE, header_problem, jpeg_reduction, to_plain_mode
from fastimagenet.dataset_tools.record_sums import SUM_NAME, encode_sums
from fastimagenet.dataset_tools.scan import FolderScan, scan_image_folder

WRITE_MODES = ("jpg", "raw", "proportion", "smart")
SIDECAR_VERSION = 1
_PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)
# Failures re-found on a re-write mean files change under us; give up rather than loop.
_MAX_PASSES = 3


@dataclass
class ConvertOptions:
    write_mode: str = "jpg"  # jpg | raw | proportion (JPEG with compress_probability) | smart (JPEG above a size)
    max_resolution: int = 512  # longer side, pixels; larger images are scaled down, smaller ones kept
    jpeg_quality: int = 90
    compress_probability: float = 0.5  # proportion mode: share of images stored as JPEG
    smart_threshold: int = 256 * 256 * 3  # smart mode: store as JPEG when the raw pixels exceed this many bytes
    workers: int = 0  # writer processes; 0: one per CPU core
    subset: int = 0  # first N images of each class (for trials); 0: all
    strict: bool = False  # an unreadable file is an error instead of a reported skip
    force: bool = False  # overwrite an existing destination

    def check(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise UserError(f"write mode '{self.write_mode}' is not one of {', '.join(WRITE_MODES)}")
        if not MIN_STORED_SIDE <= self.max_resolution <= 65535:  # FFCV stores sides as 16-bit integers
            raise UserError(f"max resolution {self.max_resolution} must be between {MIN_STORED_SIDE} and 65535 pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise UserError(f"JPEG quality {self.jpeg_quality} must be between 1 and 100")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise UserError(f"compress probability {self.compress_probability} must be between 0 and 1")
        if self.subset < 0 or self.workers < 0 or self.smart_threshold < 0:
            raise UserError("subset, workers and smart threshold must not be negative")


@dataclass
class ConvertReport:
    path: Path
    images: int
    classes: int
    bytes: int
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason

    def summary(self) -> str:
        lines = [f"{self.path}: {self.images} images, {self.classes} classes, {self.bytes / 2**20:.1f} MiB, "
                 f"{self.images / max(self.seconds, 1e-9):.0f} images/s ({self.seconds:.1f} s)"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files:")
            lines += [f"  {path}: {reason}" for path, reason in sorted(self.skipped.items())]
        return "\n".join(lines)


def sidecar_path(beton: str | os.PathLike) -> Path:
    return Path(f"{beton}.json")


def read_sidecar(beton: str | os.PathLike) -> dict:
    """The class names and write settings stored beside a .beton by `convert`."""
    path = sidecar_path(beton)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing, so the class names of {beton} are unknown; write the file with "
                        "`fastimagenet convert`") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); re-run `fastimagenet convert --force`") from None
    if not isinstance(meta, dict) or meta.get("version") != SIDECAR_VERSION or "classes" not in meta:
        raise UserError(f"{path}: not a sidecar of this version; re-run `fastimagenet convert --force`")
    return meta


def load_rgb(path: str, max_resolution: int) -> np.ndarray:
    """An image file as RGB pixels (HWC uint8, as stored: EXIF orientation ignored), longer side <= max_resolution,
    shorter side >= MIN_STORED_SIDE (what FFCV's decoders can crop)."""
    with Image.open(path) as img:  # the format is read from the content, not the file name
        problem = header_problem(img)  # checked before decoding: a file changed since it was verified
        if problem:
            raise ValueError(problem)
        img = to_plain_mode(img)  # palette, alpha, 16-bit: scaling needs a plain mode
        reduction = jpeg_reduction(*img.size) if img.format == "JPEG" else 1
        if reduction > 1:  # decoded whole it would not fit one decode's budget: at least 1/reduction, as for
            # thumbnail's own draft below (which a first draft replaces) no less than the size it asks for
            img.draft(img.mode, (min(img.width // reduction, 2 * max_resolution),
                                 min(img.height // reduction, 2 * max_resolution)))
        # thumbnail: JPEGs are first reduced in the DCT domain (draft), then resampled; never enlarges
        img.thumbnail((max_resolution, max_resolution), Image.LANCZOS)
        width, height = img.size
        if min(width, height) < MIN_STORED_SIDE:  # stretch the thin side only: the longer one stays in bounds
            img = img.resize((max(width, MIN_STORED_SIDE), max(height, MIN_STORED_SIDE)), Image.BILINEAR)
        return np.asarray(img.convert("RGB"))


class _ImageSource:
    """What FFCV's writer processes index: (pixels, label). A file that does not decode is logged, not raised."""

    def __init__(self, samples: list[tuple[str, int]], max_resolution: int, failure_log: Path):
        self.samples, self.max_resolution, self.failure_log = samples, max_resolution, failure_log

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            return load_rgb(path, self.max_resolution), label
        except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable file"
            with open(self.failure_log, "a") as log:  # one short append per line: safe across processes
                log.write(json.dumps([path, f"{type(exc).__name__}: {exc}"]) + "\n")
            return _PLACEHOLDER, label


def write_records(out: Path, source, options: ConvertOptions) -> None:
    """Write `source` (indexable: i -> (HWC uint8 RGB pixels, label)) to `out` with FFCV's writer, in `options`'
    storage mode. Its writer processes fork, so `source` is not pickled."""
    from fastimagenet.common.threads import importing_ffcv

    with importing_ffcv():  # importing FFCV sets this thread's torch count to 1
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

    image_field = RGBImageField(write_mode=options.write_mode, max_resolution=None,  # scaled by the source
                                smart_threshold=options.smart_threshold, jpeg_quality=options.jpeg_quality,
                                compress_probability=options.compress_probability)
    writer = DatasetWriter(str(out), {"image": image_field, "label": IntField()},
                           num_workers=min(options.workers or os.cpu_count() or 1, len(source)))
    writer.from_indexed_dataset(source, chunksize=max(1, min(100, math.ceil(len(source) / 16))))


def write_sidecar(beton: Path, classes: list[str], images: int, written: Path | None = None, **settings) -> None:
    """The sidecar `read_sidecar` reads: class names, image count, how the file was written and, read back from
    `written` (the finished file, maybe still under its temporary name), each record's checksum."""
    meta = dict(version=SIDECAR_VERSION, classes=list(classes), images=images, **settings)
    if written is not None:
        meta[SUM_NAME] = encode_sums(Beton(written).sums())
    with atomic_output(sidecar_path(beton)) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))


def _write_beton(out: Path, samples: list[tuple[str, int]], options: ConvertOptions) -> dict[str, str]:
    """Write `samples` to `out` with FFCV's writer; return {path: reason} for files that did not decode."""
    failure_log = out.with_name(out.name + ".failures")
    failure_log.unlink(missing_ok=True)
    try:
        write_records(out, _ImageSource(samples, options.max_resolution, failure_log), options)
        if not failure_log.exists():
            return {}
        return dict(json.loads(line) for line in failure_log.read_text().splitlines())
    finally:
        failure_log.unlink(missing_ok=True)


def first_per_class(samples: list[tuple[str, int]], count: int) -> list[tuple[str, int]]:
    kept, seen = [], {}
    for path, label in samples:
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= count:
            kept.append((path, label))
    return kept


def convert_split(src: str | os.PathLike, dst: str | os.PathLike, options: ConvertOptions,
                  classes: list[str] | None = None) -> ConvertReport:
    """One ImageFolder split -> one .beton (+ sidecar). `classes`: the train split's, when converting another."""
    options.check()
    dst = Path(dst)
    if dst.suffix != ".beton":
        raise UserError(f"{dst}: the output of one split must be a .beton file")
    if dst.exists() and not options.force:
        raise UserError(f"{dst}: already exists (add --force to overwrite it)")
    from fastimagenet.common.threads import importing_ffcv

    with importing_ffcv():  # importing FFCV sets this thread's torch count to 1
        import ffcv.writer  # noqa: F401 - its start-up (seconds of JIT set-up) stays out of the images/s figure

    from fastimagenet.dataset_tools.verify import kept_samples  # torch: imported only when converting

    start = time.perf_counter()
    scan = scan_image_folder(src, classes)
    if options.subset:
        scan = FolderScan(scan.root, scan.classes, first_per_class(scan.samples, options.subset), scan.skipped)
    samples, skipped, _ = kept_samples(scan, str(src), options.strict, report=False,  # the summary lists them
                                    lenient="leave out --strict")
    with atomic_output(dst) as tmp:  # makes the directory; a failed write is a message naming dst
        for _ in range(_MAX_PASSES):
            failures = _write_beton(tmp, samples, options)
            if not failures:
                break
            if options.strict:
                path, reason = sorted(failures.items())[0]
                raise UserError(f"{path}: unreadable image ({reason}); {len(failures)} such files in {src} "
                                "(leave out --strict to skip and report them)")
            skipped.update(failures)
            samples = [(path, label) for path, label in samples if path not in failures]
            if not samples:
                raise UserError(f"{src}: none of the images could be decoded")
        else:
            raise UserError(f"{src}: files keep failing to decode on each pass; are they being modified?")
        write_sidecar(dst, scan.classes, len(samples), tmp, source=str(Path(src).resolve()), skipped=skipped,
                      **{k: v for k, v in asdict(options).items() if k not in ("force", "workers", "strict")})
    return ConvertReport(dst, len(samples), len(scan.classes), dst.stat().st_size, time.perf_counter() - start,
                         skipped)


def convert_folder(src_dir: str | os.PathLike, dst_beton_path: str | os.PathLike,
                   classes: list[str] | None = None, **options) -> Path:
    """One split -> .beton with default settings; `options` are ConvertOptions fields."""
    return convert_split(src_dir, dst_beton_path, ConvertOptions(**options), classes).path


def convert(src: str | os.PathLike, dst: str | os.PathLike, options: ConvertOptions,
            classes: list[str] | None = None) -> list[ConvertReport]:
    """A dataset root with train/ and val/ -> DST/train.beton + DST/val.beton (val labelled with train's classes),
    or one split -> DST.beton."""
    src, dst = Path(src), Path(dst)
    if not ((src / "train").is_dir() and (src / "val").is_dir()):
        return [convert_split(src, dst, options, classes)]
    if dst.suffix == ".beton":
        raise UserError(f"{src} holds train/ and val/: give an output directory, not {dst}")
    outputs = [dst / "train.beton", dst / "val.beton"]
    existing = [str(path) for path in outputs if path.exists()]
    if existing and not options.force:  # refuse before writing anything
        raise UserError(f"{', '.join(existing)}: already exists (add --force to overwrite)")
    # val's classes are checked before anything is written: found after train.beton, the mistake would leave that
    # file behind, which a re-run then refuses to overwrite
    scan_image_folder(src / "val", classes or scan_image_folder(src / "train").classes)
    train = convert_split(src / "train", outputs[0], options, classes)
    val = convert_split(src / "val", outputs[1], options, read_sidecar(train.path)["classes"])
    return [train, val]
