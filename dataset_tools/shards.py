"""Sharded datasets: `fastimagenet convert SRC DST --format shards`, and the index every loader reads them by.

Layout of a split (a local folder or an s3:// prefix):
- `shard-NNNNNN.tar`: WebDataset-layout tar files, each sample `<key>.jpg` (the JPEG) + `<key>.cls` (its label as
  decimal text); keys are the samples' positions in the dataset, so a shard holds a contiguous range of them. Any
  WebDataset reader reads them. The dataset's order is the folder's (by class, then file name) drawn into a fixed
  shuffled order (seed 0; --shard-order folder keeps the folder's), so that every shard holds samples of many
  classes: a loader that shuffles shards and a bounded buffer of samples (loaders/shard_source.py) then gets
  batches about as mixed as a uniform shuffle's. Read in the dataset's order (validation), labels come unsorted.
- `shard-NNNNNN.idx`: DALI's webdataset index of that shard (the `wds2idx` layout, version v1.2: a line
  "v1.2 <samples>", then per sample "<ext> <data offset> <size> <member name>" for each of its files), so DALI's
  reader needs no scan of the tar.
- `index.json`: the class names, every shard's name, sample count, byte size and sha256, and per sample its label,
  image size (for crops drawn before decoding) and the JPEG's offset and length in its shard (random access without
  reading the tar's headers); the convert settings and the files left out. It is written last: a prefix without
  index.json is not a dataset, so a killed convert never leaves one that looks whole (shards are written through
  temporary names too).

Images follow `convert`'s rules (dataset_tools/convert.py: the same verification, decoding, RGB conversion and
max-resolution scaling); a JPEG already within the limits is stored as it is, byte for byte, everything else
re-encoded as a JPEG.

Shard size: 256 MB by default (--shard-size-mb). WebDataset's documentation suggests shards of roughly 100 MB to
1 GB: large enough that one GET's latency (tens of ms) is nothing against its transfer and a store sees few
requests (ImageNet's 140 GB is ~550 shards), small enough that a node's cache evicts and refills in small steps and
that every rank of a large job gets several shards to read.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools import object_store
from fastimagenet.dataset_tools.convert import ConvertOptions, ConvertReport, first_per_class, load_rgb
from fastimagenet.dataset_tools.image_rules import header_problem
from fastimagenet.dataset_tools.scan import FolderScan, scan_image_folder

INDEX_NAME = "index.json"
INDEX_FORMAT, INDEX_VERSION = "fastimagenet-shards", 1
DEFAULT_SHARD_MB = 256
SHARD_ORDERS = ("shuffled", "folder")
_SHUFFLE_SEED = 0
_WDS_INDEX_VERSION = "v1.2"  # DALI's webdataset index format (its tools/wds2idx.py writes this version)
_ENCODE_WINDOW = 512  # images encoded ahead of the shard writer
_BLOCK = 512  # tar's block size: a member's data starts after its 512-byte header (short names, ustar)


@dataclass
class Shard:
    name: str  # the tar's file name; its DALI index is the same name with .idx
    first: int  # the dataset index of its first sample (a shard holds a contiguous range)
    samples: int
    bytes: int
    sha256: str

    @property
    def idx_name(self) -> str:
        return self.name[: -len(".tar")] + ".idx"


@dataclass
class ShardIndex:
    """A split's index.json, its per-sample arrays as numpy arrays (one entry per sample, in key order)."""

    url: str  # the split's folder or s3:// prefix
    classes: list[str]
    shards: list[Shard]
    labels: np.ndarray  # int64
    sizes: np.ndarray  # (samples, 2) int32: width, height
    offsets: np.ndarray  # int64: the JPEG's data offset in its shard
    lengths: np.ndarray  # int64
    shard_of: np.ndarray  # int32: which shard holds the sample
    settings: dict

    def __len__(self) -> int:
        return len(self.labels)

    def shard_url(self, shard: int) -> str:
        return object_store.join(self.url, self.shards[shard].name)


def is_shard_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` names a sharded split: any s3:// URL (its index is checked when read), or a local folder
    holding index.json."""
    return object_store.is_remote(path) or (Path(path) / INDEX_NAME).is_file()


def read_index(url: str) -> ShardIndex:
    index_url = object_store.join(url, INDEX_NAME)
    try:
        data = object_store.read_bytes(index_url)
    except object_store.MissingObject:
        raise UserError(f"{index_url}: missing, so {url} is not a sharded dataset (write one with `fastimagenet "
                        "convert SRC DST --format shards`; a convert that did not finish writes no index)") from None
    try:
        meta = json.loads(data)
        if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise ValueError("not an index of this version")
        shards = [Shard(**{k: entry[k] for k in ("name", "first", "samples", "bytes", "sha256")})
                  for entry in meta["shards"]]
        per_sample = {k: [v for entry in meta["shards"] for v in entry[k]]
                      for k in ("labels", "sizes", "offsets", "lengths")}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{index_url}: unreadable ({exc}); write the dataset again with `fastimagenet convert "
                        "--format shards --force`") from None
    counts = [shard.samples for shard in shards]
    return ShardIndex(url=url, classes=meta["classes"], shards=shards,
                      labels=np.array(per_sample["labels"], dtype=np.int64),
                      sizes=np.array(per_sample["sizes"], dtype=np.int32).reshape(-1, 2),
                      offsets=np.array(per_sample["offsets"], dtype=np.int64),
                      lengths=np.array(per_sample["lengths"], dtype=np.int64),
                      shard_of=np.repeat(np.arange(len(shards), dtype=np.int32), counts),
                      settings=meta.get("settings", {}))


def encoded_image(path: str, max_resolution: int, jpeg_quality: int) -> tuple[bytes, int, int]:
    """The JPEG stored for image file `path`, and its width and height: the file itself when it is an RGB or
    grayscale JPEG within max_resolution, else convert's pixels (load_rgb) encoded as a JPEG."""
    with Image.open(path) as img:
        problem = header_problem(img)  # checked before decoding: a file changed since it was verified
        if problem:
            raise ValueError(problem)
        if img.format == "JPEG" and img.mode in ("RGB", "L") and max(img.size) <= max_resolution:
            return Path(path).read_bytes(), *img.size
    pixels = load_rgb(path, max_resolution)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=jpeg_quality)
    return out.getvalue(), pixels.shape[1], pixels.shape[0]


def _encode_all(samples: list[tuple[str, int]], options: ConvertOptions):
    """(path, label, jpeg bytes or None, width, height, failure reason) per sample, in order, a few in flight at
    once (PIL releases the GIL while it decodes and encodes)."""

    def one(sample):
        path, label = sample
        try:
            return (path, label, *encoded_image(path, options.max_resolution, options.jpeg_quality), None)
        except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable file"
            return path, label, None, 0, 0, f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=options.workers or os.cpu_count() or 1) as pool:
        for start in range(0, len(samples), _ENCODE_WINDOW):  # a window at a time: memory stays bounded
            yield from pool.map(one, samples[start : start + _ENCODE_WINDOW])


class _ShardWriter:
    """Writes one shard's tar and DALI index into a local folder, under temporary names until finished."""

    def __init__(self, folder: Path, number: int, first: int):
        self.name, self.first = f"shard-{number:06d}.tar", first
        self.path = folder / self.name
        self.tmp = folder / f".{self.name}.tmp{os.getpid()}"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.labels, self.sizes, self.offsets, self.lengths, self.idx_lines = [], [], [], [], []

    def add(self, data: bytes, label: int, width: int, height: int) -> None:
        key = f"{self.first + len(self.labels):09d}"
        components = []
        for ext, payload in (("jpg", data), ("cls", str(label).encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644  # no dates: the same input, the same bytes
            offset = self.tar.offset + _BLOCK
            self.tar.addfile(info, io.BytesIO(payload))
            components.append(f"{ext} {offset} {len(payload)} {info.name}")
            if ext == "jpg":
                self.offsets.append(offset)
                self.lengths.append(len(payload))
        self.idx_lines.append(" ".join(components))
        self.labels.append(label)
        self.sizes.append([width, height])

    @property
    def bytes(self) -> int:
        return self.tar.offset

    def finish(self) -> dict:
        """Closes the tar; renames it and its .idx into place; returns its entry of index.json."""
        self.tar.close()
        idx = self.path.with_suffix(".idx")
        with atomic_output(idx) as tmp:
            tmp.write_text(f"{_WDS_INDEX_VERSION} {len(self.labels)}\n" + "\n".join(self.idx_lines) + "\n")
        os.replace(self.tmp, self.path)
        return dict(name=self.name, first=self.first, samples=len(self.labels), bytes=self.path.stat().st_size,
                    sha256=object_store.file_sha256(self.path), labels=self.labels, sizes=self.sizes,
                    offsets=self.offsets, lengths=self.lengths)

    def abandon(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def _scanned(src: str | os.PathLike, options: ConvertOptions, classes: list[str] | None):
    from fastimagenet.dataset_tools.verify import kept_samples  # torch: imported only when converting

    scan = scan_image_folder(src, classes)
    if options.subset:
        scan = FolderScan(scan.root, scan.classes, first_per_class(scan.samples, options.subset), scan.skipped)
    samples, skipped, _ = kept_samples(scan, str(src), options.strict, report=False,  # the summary lists them
                                    lenient="leave out --strict")
    return scan.classes, samples, dict(skipped)


def convert_split_to_shards(src: str | os.PathLike, dst: str, options: ConvertOptions,
                            classes: list[str] | None = None, shard_mb: float = DEFAULT_SHARD_MB,
                            order: str = "shuffled") -> ConvertReport:
    """One ImageFolder split -> shards + their DALI indexes + index.json in the folder or s3:// prefix `dst`."""
    options.check()
    if shard_mb <= 0:
        raise UserError(f"shard size {shard_mb} MB must be positive")
    if order not in SHARD_ORDERS:
        raise UserError(f"shard order '{order}' is not one of {', '.join(SHARD_ORDERS)}")
    index_url = object_store.join(dst, INDEX_NAME)
    if object_store.exists(index_url) and not options.force:
        raise UserError(f"{index_url}: already exists (add --force to overwrite the dataset)")
    start = time.perf_counter()
    classes, samples, skipped = _scanned(src, options, classes)
    if order == "shuffled":
        samples = [samples[i] for i in np.random.default_rng(_SHUFFLE_SEED).permutation(len(samples))]
    remote = object_store.is_remote(dst)
    # shards are written locally first (into dst itself, or a scratch folder they are uploaded from)
    folder = Path(tempfile.mkdtemp(prefix="fastimagenet-shards-")) if remote else Path(dst)
    folder.mkdir(parents=True, exist_ok=True)
    limit = shard_mb * 1e6
    entries, writer, total = [], None, 0
    try:
        if object_store.exists(index_url):  # --force: the old dataset stops being one before its shards change
            object_store.delete(index_url)
        for path, label, data, width, height, failure in _encode_all(samples, options):
            if failure is not None:
                if options.strict:
                    raise UserError(f"{path}: unreadable image ({failure}) (leave out --strict to skip and "
                                    "report such files)")
                skipped[path] = failure
                continue
            if writer is None:
                writer = _ShardWriter(folder, len(entries), sum(entry["samples"] for entry in entries))
            writer.add(data, label, width, height)
            if writer.bytes >= limit:
                entries.append(_finish(writer, folder, dst, remote))
                total, writer = total + entries[-1]["bytes"], None
        if writer is not None:
            entries.append(_finish(writer, folder, dst, remote))
            total, writer = total + entries[-1]["bytes"], None
        if not entries:
            raise UserError(f"{src}: none of the images could be decoded")
        settings = {k: v for k, v in asdict(options).items() if k in ("max_resolution", "jpeg_quality", "subset")}
        index = dict(format=INDEX_FORMAT, version=INDEX_VERSION, classes=classes,
                     samples=sum(entry["samples"] for entry in entries), shards=entries,
                     settings=dict(settings, shard_mb=shard_mb, order=order, source=str(Path(src).resolve())),
                     skipped=skipped)
        object_store.put_bytes(json.dumps(index).encode(), index_url)  # last: now it is a dataset
    finally:
        if writer is not None:
            writer.abandon()
        if remote:
            shutil.rmtree(folder, ignore_errors=True)
    return ConvertReport(Path(dst) if not remote else dst, index["samples"], len(classes), total,
                         time.perf_counter() - start, skipped)


def _finish(writer: _ShardWriter, folder: Path, dst: str, remote: bool) -> dict:
    entry = writer.finish()
    if remote:  # uploaded, then the local copy goes
        for name, sha256 in ((writer.name, entry["sha256"]), (writer.path.with_suffix(".idx").name, None)):
            object_store.put_file(folder / name, object_store.join(dst, name), sha256)
            (folder / name).unlink()
    return entry


def convert_to_shards(src: str | os.PathLike, dst: str, options: ConvertOptions, classes: list[str] | None = None,
                      shard_mb: float = DEFAULT_SHARD_MB, order: str = "shuffled") -> list[ConvertReport]:
    """A dataset root with train/ and val/ -> DST/train/ and DST/val/ (val labelled with train's classes), or one
    split -> DST."""
    src = Path(src)
    if not ((src / "train").is_dir() and (src / "val").is_dir()):
        return [convert_split_to_shards(src, dst, options, classes, shard_mb, order)]
    train_classes = classes or scan_image_folder(src / "train").classes
    scan_image_folder(src / "val", train_classes)  # a mistake in val is found before anything is written
    train = convert_split_to_shards(src / "train", object_store.join(dst, "train"), options, train_classes, shard_mb,
                                    order)
    val = convert_split_to_shards(src / "val", object_store.join(dst, "val"), options, train_classes, shard_mb, order)
    return [train, val]
