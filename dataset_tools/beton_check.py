"""The check every .beton gets when it is opened: its tables against each other and against the file.

A loader trusts a record's data pointer and its allocation's size; one that a bad disk, a torn copy or a half-synced
bucket has changed points anywhere, and FFCV reads whatever lies there without a word. So, before anything is read,
every record is checked in a few array operations (a fraction of a second for ImageNet's 1.28 M records): its image
pointer is an allocation of that same record, inside the data pages; its storage mode is one FFCV writes; a raw
record holds width x height x 3 bytes; its label is one of the dataset's classes. The header's table positions must
agree with the file's size. What this cannot see is a changed byte inside an image's own data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastimagenet.common.errors import UserError

_JPEG, _RAW = 0, 1  # FFCV's storage modes of an RGB image record
_SHOWN = 5  # bad records named in a message


def record_extents(images: np.ndarray, alloc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each image record's size in bytes, whether its pointer is an allocation of that record: else size 0), from
    the allocation table (sample_id, ptr, size) in any order."""
    ptr = images["data_ptr"].astype(np.uint64)
    if not len(alloc):
        return np.zeros(len(images), dtype=np.int64), np.zeros(len(images), dtype=bool)
    by_ptr = np.argsort(alloc["ptr"], kind="stable")
    owner = by_ptr[np.minimum(np.searchsorted(alloc["ptr"][by_ptr], ptr), len(alloc) - 1)]
    allocated = (alloc["ptr"][owner] == ptr) & (alloc["sample_id"][owner] == np.arange(len(images), dtype=np.uint64))
    return np.where(allocated, alloc["size"][owner], 0).astype(np.int64), allocated


def record_problems(images: np.ndarray, labels: np.ndarray, alloc: np.ndarray, data_start: int, data_end: int,
                    classes: int | None, limit: int = _SHOWN) -> tuple[int, dict[int, str]]:
    """(how many records are bad, {record index: its first problem} for the first `limit` of them) for FFCV's tables:
    `images` the RGB image field's metadata (mode, width, height, data_ptr), `labels` the int field's, `alloc` the
    allocation table (sample_id, ptr, size, at least one row per record); data lies in [data_start, data_end).
    `classes`: the class count labels must stay under (None: not checked)."""
    count = len(images)
    if not count:
        return 0, {}
    ptr = images["data_ptr"].astype(np.uint64)
    size, allocated = record_extents(images, alloc)
    width, height, mode = images["width"].astype(np.int64), images["height"].astype(np.int64), images["mode"]
    outside = (ptr < data_start) | (ptr >= data_end)
    checks = [  # (bad records, why), in the order a record's first problem is named
        (outside, lambda i: "data pointer outside the file's data"),
        (~outside & ~allocated, lambda i: "data pointer is not an allocation of this record"),
        (allocated & (ptr + size.astype(np.uint64) > data_end), lambda i: "data runs past the file's data"),
        ((mode != _JPEG) & (mode != _RAW), lambda i: f"unknown storage mode {mode[i]}"),
        ((width == 0) | (height == 0), lambda i: "zero width or height"),
        (allocated & (mode == _RAW) & (size != width * height * 3),
         lambda i: f"raw record of {size[i]} bytes for a {width[i]}x{height[i]} RGB image"),
        (allocated & (mode == _JPEG) & (size == 0), lambda i: "empty JPEG record"),
    ]
    if classes is not None:
        checks.append(((labels < 0) | (labels >= classes), lambda i: f"label {labels[i]} is not one of the "
                                                                     f"{classes} classes"))
    bad = np.logical_or.reduce([mask for mask, _ in checks])
    first = {index: next(why(index) for mask, why in checks if mask[index])
             for index in np.flatnonzero(bad)[:limit].tolist()}
    return int(bad.sum()), first


def file_problem(file_size: int, num_samples: int, data_start: int, alloc_table_ptr: int, alloc_itemsize: int,
                 allocations: int) -> str | None:
    """What is wrong with the header's table positions against the file, or None."""
    if data_start > file_size or not data_start <= alloc_table_ptr <= file_size:
        return f"its header places the tables outside its {file_size} bytes (a truncated or overwritten file)"
    if (file_size - alloc_table_ptr) % alloc_itemsize or allocations < num_samples:
        return (f"its allocation table ({file_size - alloc_table_ptr} bytes at the end) is torn: {allocations} "
                f"allocations for {num_samples} records")
    return None


def table_problems(path: Path, reader, images: np.ndarray, labels: np.ndarray, classes: int | None,
                   limit: int = _SHOWN) -> tuple[int, dict[int | str, str]]:
    """(bad records, {record index, or "file": the first problems}) of an opened FFCV reader's tables."""
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    file_size = path.stat().st_size
    data_start = HeaderType.itemsize + reader.field_descriptors.nbytes + reader.metadata.nbytes
    alloc_table_ptr = int(reader.header["alloc_table_ptr"])
    problem = file_problem(file_size, int(reader.num_samples), data_start, alloc_table_ptr, ALLOC_TABLE_TYPE.itemsize,
                           len(reader.alloc_table))
    if problem:
        return int(reader.num_samples), {"file": problem}
    return record_problems(images, labels, reader.alloc_table, data_start, alloc_table_ptr, classes, limit)


def damaged_beton_error(path: Path, count: int, first: dict[int | str, str]) -> UserError:
    shown = "; ".join(reason if where == "file" else f"record {where}: {reason}" for where, reason in first.items())
    more = f" ({count} bad records in all)" if count > len(first) and "file" not in first else ""
    return UserError(f"{path}: damaged .beton file: {shown}{more}. Write it again from the source images "
                     "(`fastimagenet convert SRC DST --force`) or copy it again")
