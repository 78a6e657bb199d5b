"""An FFCV image decoder that takes each training sample's crop window and flip from us, not from its own RNG.

FFCV's random-resized-crop decoder draws crops with numba's per-thread random state: they differ between runs and
with the thread count, and a resumed epoch cannot get its uninterrupted pass's crops. This decoder crops, resizes
(FFCV's OpenCV area resize) and flips each sample by a row (left, top, right, bottom, flip) of a per-batch window
buffer, which the epoch thread fills from (seed, epoch, index) just before the batch is decoded
(`WindowCropDecoder.fill`). The windows come from loaders/augment.py, so every backend gives a sample the same crop.

A JPEG record is decoded by the project's region decoder (loaders/_jpeg_roi.c, called as a C function from the
compiled pipeline, in FFCV's own decode threads): only the window's rows and columns, at the largest DCT reduction
(1/2, 1/4, 1/8) that leaves the window at least the output size, as the torchvision backend decodes. FFCV decodes
every record whole, so its cost does not fall with the resolution; this one's does (BENCHMARKS.md). Raw-pixel
records, and a record the region decoder refuses, take FFCV's whole decode.
"""

from __future__ import annotations

import ctypes
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

from fastimagenet.loaders.image_decode import dct_reduction

WINDOW_COLUMNS = 5  # left, top, right, bottom (whole source pixels), flip (0 or 1)

try:  # the project's region decoder (loaders/_jpeg_roi.c), called as a C function from the compiled pipeline
    from fastimagenet.loaders import _jpeg_roi

    _region = ctypes.CDLL(_jpeg_roi.__file__).fastimagenet_decode_region
    _region.restype = ctypes.c_long
    _region.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, *4 * [ctypes.c_long], ctypes.c_void_p,
                        ctypes.c_uint64, ctypes.c_void_p]

    def decode_region(data, scale, left, top, right, bottom, out, geometry):
        """The window (in the coordinates of the image scaled by 1/scale) into `out`: rows of geometry[0] RGB pixels,
        the window's first column geometry[1] pixels in. Returns the rows, or a negative number on failure."""
        return _region(data.ctypes.data, data.size, scale, left, top, right, bottom, out.ctypes.data, out.size,
                       geometry.ctypes.data)
except (ImportError, OSError, AttributeError):  # not built: every JPEG decodes whole, as FFCV's own decoder does
    def decode_region(data, scale, left, top, right, bottom, out, geometry):
        return -1


class WindowCropDecoder(SimpleRGBImageDecoder):
    def __init__(self, output_size: tuple[int, int]):
        super().__init__()
        self.output_size = output_size  # read when an epoch allocates its buffers: a new stage needs no rebuild

    def declare_state_and_memory(self, previous_state):
        # uint64: a product of widths and heights must not overflow
        max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
        shape = (self.output_size[0], self.output_size[1], 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                (AllocationQuery(shape, np.dtype("<u1")),  # the batch
                 AllocationQuery((max_pixels * np.uint64(3),), np.dtype("<u1")),  # a sample decoded whole
                 AllocationQuery((WINDOW_COLUMNS,), np.dtype("<i4")),  # the sample's window, filled by `fill`
                 AllocationQuery((2,), np.dtype("<u4"))))  # a region decode's row width and first column

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        read = self.memory_read
        samples = Compiler.get_iterator()
        decode_c, resize_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        region_c, reduction_c = Compiler.compile(decode_region), Compiler.compile(dct_reduction)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, decoded, windows, geometry = my_storage
            for k in samples(len(batch_indices)):
                field = metadata[batch_indices[k]]
                data = read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                left, top, right, bottom, flip = windows[k]
                out = destination[k]
                # the window alone, at the largest DCT reduction that keeps it at least the output size
                scale = reduction_c(min(right - left, bottom - top), min(out.shape[0], out.shape[1]))
                scaled_left, scaled_top = left // scale, top // scale
                scaled_right = max(scaled_left + 1, -(-right // scale))
                scaled_bottom = max(scaled_top + 1, -(-bottom // scale))
                rows = -1
                if field["mode"] == jpg:
                    rows = region_c(data, scale, scaled_left, scaled_top, scaled_right, scaled_bottom, decoded[k],
                                    geometry[k])
                if rows > 0:
                    row_width, first = geometry[k][0], geometry[k][1]
                    image = decoded[k][: 3 * rows * row_width].reshape(rows, row_width, 3)
                    resize_c(image, 0, rows, first, first + scaled_right - scaled_left, out)
                else:
                    if field["mode"] == jpg:  # a decode the region decoder refused: whole, as FFCV decodes
                        image = decoded[k]
                        decode_c(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = image.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        image = data.reshape(height, width, 3)
                    resize_c(image, top, bottom, left, right, out)
                if flip:
                    last = out.shape[1] - 1
                    for y in range(out.shape[0]):
                        for x in range(out.shape[1] // 2):
                            for c in range(3):
                                out[y, x, c], out[y, last - x, c] = out[y, last - x, c], out[y, x, c]
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode

    @staticmethod
    def fill(memory_allocations: dict, node_id: int, batch_slot: int, windows: np.ndarray) -> None:
        """Write a batch's windows into the buffer its decode reads (FFCV's per-epoch allocation for this decoder's
        graph node: one array per query, each indexed by batch slot, then sample)."""
        memory_allocations["operation"][node_id][2][batch_slot][: len(windows)] = windows
