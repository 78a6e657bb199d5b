"""Find the images of a scanned ImageFolder that do not decode, before a decoder that cannot skip them meets them.

Every backend and `convert` take their samples from here, so a file is kept by all of them or reported by all of
them (the rule: dataset_tools/image_rules.py). Some decoders fail the whole pipeline on one truncated or mislabelled
file (DALI's), decode a damaged one into grey or noise without a word (OpenCV's), spend minutes and gigabytes on a
decompression bomb (DALI's), or abort the process on a tiny image (FFCV's), so such files leave the sample list up
front. Each file is decoded once at 1/8 scale (the JPEG decoder still reads every byte, so a truncated
file is caught at a fraction of the full decode cost), and the verdicts are cached per dataset, keyed by file size
and modification time: the next run re-checks only new or changed files. A verdict records the image's size from its
header too, so a loader that draws crop boxes before decoding (DALI's) needs no pass over the headers of its own. Under torchrun the check is done once per
node: local rank 0 verifies and writes the cache while the node's other processes wait, then they read its verdicts.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.barrier import wait_for_every_rank
from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools.image_rules import KEPT_FORMATS, header_problem
from fastimagenet.dataset_tools.scan import FolderScan

_CACHE_VERSION = 4  # 2: the pixel limit and the shared format list; 3: image sizes; 4: the decode budget


def cache_root() -> Path:
    """Where the project keeps what it derives from datasets (verdicts, reduced copies): $FASTIMAGENET_CACHE."""
    return Path(os.environ.get("FASTIMAGENET_CACHE", Path.home() / ".cache" / "fastimagenet"))


def cache_dir() -> Path:
    return cache_root() / "verified"


class Verdict(NamedTuple):
    problem: str | None  # why the file is not kept (image_rules: its format, its size, a failed decode), or None
    width: int  # from the header; 0 when the file has none that PIL reads
    height: int


def inspect_image(path: str, formats: frozenset[str] = KEPT_FORMATS) -> Verdict:
    """Whether `path` is kept, and its size as its header states it."""
    width = height = 0
    try:
        with Image.open(path) as img:  # the header only; PIL itself refuses sizes above 2x its pixel limit
            width, height = img.size
            problem = header_problem(img)
            if problem is None and img.format not in formats:
                problem = f"{img.format} images are not supported by this loader"
            if problem:
                return Verdict(problem, width, height)
            img.draft(img.mode, (1, 1))  # JPEG: decode at 1/8 scale; other formats ignore it
            img.load()
    except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable file"
        return Verdict(f"{type(exc).__name__}: {exc}", width, height)
    return Verdict(None, width, height)


def _cache_file(root: Path, formats: frozenset[str]) -> Path:
    key = f"{root.resolve()}|{','.join(sorted(formats))}"
    return cache_dir() / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.json"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: verify again
    return data.get("files", {}) if isinstance(data, dict) and data.get("version") == _CACHE_VERSION else {}


def _save_cache(path: Path, files: dict) -> None:
    """Written atomically, so a crash never leaves a half-written cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps({"version": _CACHE_VERSION, "files": files}))
    except OSError as exc:  # an unwritable cache only costs the next run a re-check
        print(f"warning: could not write the image verification cache {path}: {exc}")


class Kept(NamedTuple):
    samples: list[tuple[str, int]]  # (path, label) of the files kept, in the scan's order
    skipped: dict[str, str]  # path -> why it is left out
    sizes: list[tuple[int, int]]  # (width, height) of each kept sample, from its header


def verified_samples(scan: FolderScan, formats: frozenset[str] = KEPT_FORMATS, local_rank: int = 0) -> Kept:
    """The scan's samples that decode (with their sizes), and {path: reason} for those that do not. With a process
    group, local rank 0 verifies first and the others wait at a barrier (every rank meets it once), then find its
    verdicts in the cache; they verify only what it could not cache."""
    # In the store, not an NCCL barrier: a first verification may outlast the process group's timeout.
    if local_rank != 0:
        wait_for_every_rank("verification")  # until every node's local rank 0 has written its cache
    try:
        return _verify(scan, formats)
    finally:
        if local_rank == 0:
            wait_for_every_rank("verification")  # release this node's other ranks (and meet the other nodes')


def kept_samples(scan: FolderScan, what: str, strict: bool = False, local_rank: int = 0, report: bool = True,
                 lenient: str = "set data.strict=false") -> Kept:
    """What a backend (or `convert`) uses: the kept samples, and {path: reason} for everything else the scan found
    (non-image files, broken links) or verification refused, printed here with `report`. `strict`: a refused image
    file is an error instead, whose message says how to turn strict mode off (`lenient`)."""
    samples, unreadable, sizes = verified_samples(scan, local_rank=local_rank)
    if unreadable and strict:
        path, reason = next(iter(unreadable.items()))
        raise UserError(f"{path}: unreadable image ({reason}); {len(unreadable)} such files in {what} ({lenient} "
                        "to skip and report them)")
    if not samples:
        raise UserError(f"{what}: none of the {len(scan.samples)} image files can be used ({_listing(unreadable)})")
    skipped = {**scan.skipped, **unreadable}
    if skipped and report:
        print(f"warning: {len(skipped)} files of {what} left out:\n{_listing(skipped)}")
    return Kept(samples, skipped, sizes)


def _listing(skipped: dict[str, str], count: int = 10) -> str:
    more = f"\n  ... and {len(skipped) - count} more" if len(skipped) > count else ""
    return "\n".join(f"  {path}: {reason}" for path, reason in list(skipped.items())[:count]) + more


def _verify(scan: FolderScan, formats: frozenset[str]) -> Kept:
    cache_path = _cache_file(scan.root, formats)
    cached = _load_cache(cache_path)
    verdicts: dict[str, list] = {}
    to_check = []
    for path, _ in scan.samples:
        try:
            stat = os.stat(path)
        except OSError as exc:
            verdicts[path] = [-1, -1, f"{type(exc).__name__}: {exc}", 0, 0]
            continue
        entry = cached.get(path)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            verdicts[path] = entry
        else:
            to_check.append((path, stat.st_size, stat.st_mtime_ns))
    if to_check:
        if len(to_check) > 5000:
            print(f"verifying {len(to_check)} images under {scan.root} (once; cached in {cache_path.parent})")
        # PIL releases the GIL while decoding, so threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            found = pool.map(lambda item: inspect_image(item[0], formats), to_check, chunksize=64)
            for (path, size, mtime), verdict in zip(to_check, found):
                verdicts[path] = [size, mtime, *verdict]
        _save_cache(cache_path, verdicts)
    good = [(path, label) for path, label in scan.samples if verdicts[path][2] is None]
    bad = {path: verdict[2] for path, verdict in verdicts.items() if verdict[2] is not None}
    return Kept(good, bad, [tuple(verdicts[path][3:5]) for path, _ in good])
