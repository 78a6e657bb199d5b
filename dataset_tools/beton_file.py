"""A .beton opened for reading straight from the file, without a loader or a JIT compile: its tables (checked when
it opens: dataset_tools/beton_check.py), each record's bytes, checksums and pixels. `inspect`, `convert` (which
reads the finished file back for its checksums) and the ffcv loader (its open-time checks) use it.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools.beton_check import damaged_beton_error, record_extents, table_problems
from fastimagenet.dataset_tools.record_sums import record_sums

CHANGED_BYTES = "its bytes are not those convert wrote (checksum mismatch)"


class Beton:
    """A .beton opened for reading records straight from the file (no loader, no JIT compile)."""

    def __init__(self, path: str | os.PathLike):
        from fastimagenet.common.threads import importing_ffcv

        with importing_ffcv():  # FFCV's first import picks numba's threading layer and sets torch's thread count
            from ffcv.reader import Reader

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file")
        try:
            self.reader = Reader(str(self.path))
        except (AssertionError, ValueError, OSError, IndexError) as exc:
            raise UserError(f"{self.path}: not a readable .beton file ({type(exc).__name__}: {exc})") from None
        self.images = self._field("RGBImageField")  # per record: mode, width, height, data_ptr
        self.labels = self._field("IntField")
        self.record_bytes, _ = record_extents(self.images, self.reader.alloc_table)  # 0 where not allocated
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")

    def sums(self) -> np.ndarray:
        """Each record's checksum as its bytes are now (dataset_tools/record_sums.py)."""
        return record_sums(self._data, self.images["data_ptr"], self.record_bytes)

    def check_records(self, indices: np.ndarray, stored: np.ndarray) -> None:
        """Stop with an error naming the records among `indices` whose bytes do not match their stored sums."""
        sums = record_sums(self._data, self.images["data_ptr"][indices], self.record_bytes[indices])
        changed = indices[sums != stored[indices]]
        if len(changed):
            raise UserError(f"{self.path}: record {', '.join(map(str, changed[:5].tolist()))}: {CHANGED_BYTES}: the "
                            "file changed after convert wrote it (a bad disk, a torn copy). Write it again "
                            "(`fastimagenet convert SRC DST --force`) or copy it again; loader.ffcv.verify=off "
                            "trains on it as it is")

    def table_problems(self, classes: int | None) -> tuple[int, dict[int | str, str]]:
        """(bad records, the first problems) of its tables (dataset_tools/beton_check.py)."""
        return table_problems(self.path, self.reader, self.images, self.labels, classes)

    def check_tables(self, classes: int | None) -> None:
        """Stop with an error naming the first bad records, before anything reads one."""
        count, first = self.table_problems(classes)
        if count:
            raise damaged_beton_error(self.path, count, first)

    def _field(self, type_name: str) -> np.ndarray:
        for index, handler in enumerate(self.reader.handlers.values()):
            if type(handler).__name__ == type_name:
                return self.reader.metadata[f"f{index}"]
        raise UserError(f"{self.path}: has no {type_name} (fields: {', '.join(self.reader.handlers)})")

    def pixels(self, index: int) -> np.ndarray:
        """Record `index` as RGB pixels (HWC uint8); ValueError says why it does not decode."""
        record = self.images[index]
        ptr, height, width = int(record["data_ptr"]), int(record["height"]), int(record["width"])
        size = int(self.record_bytes[index])
        if not size or ptr + size > len(self._data):
            raise ValueError("data pointer outside the file")
        data = np.asarray(self._data[ptr : ptr + size])
        if record["mode"] == 1:
            if size != height * width * 3:
                raise ValueError(f"raw record of {size} bytes for a {width}x{height} RGB image")
            return data.reshape(height, width, 3)
        if record["mode"] != 0:
            raise ValueError(f"unknown storage mode {record['mode']}")
        pixels = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if pixels is None or pixels.shape != (height, width, 3):
            raise ValueError(f"JPEG does not decode to {width}x{height} RGB")
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)

    def problems(self, limit: int, stored: np.ndarray | None) -> dict[int, str]:
        """{record index: why it is not the image convert wrote}, stopping after `limit` problems: bytes that differ
        from the `stored` checksums (where there are some), then records that do not decode."""
        found = {}
        if stored is not None:
            for index in np.flatnonzero(self.sums() != stored)[:limit].tolist():
                found[index] = CHANGED_BYTES
        for index in range(len(self.images)):
            if len(found) >= limit:
                break
            try:
                self.pixels(index)
            except ValueError as exc:
                found.setdefault(index, str(exc))
        return dict(sorted(found.items()))
