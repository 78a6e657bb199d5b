"""An FFCV image decoder that takes each training sample's crop window and flip from us, not from its own RNG.

FFCV's random-resized-crop decoder draws crops with numba's per-thread random state: they differ between runs and
with the thread count, and a resumed epoch cannot get its uninterrupted pass's crops. This decoder crops, resizes
(FFCV's OpenCV area resize) and flips each sample by a row (left, top, right, bottom, flip) of a per-batch window
buffer, which the epoch thread fills from (seed, epoch, index) just before the batch is decoded
(`WindowCropDecoder.fill`). The windows come from loaders/augment.py, so every backend gives a sample the same crop.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

WINDOW_COLUMNS = 5  # left, top, right, bottom (whole source pixels), flip (0 or 1)


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
                 AllocationQuery((WINDOW_COLUMNS,), np.dtype("<i4"))))  # the sample's window, filled by `fill`

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        read = self.memory_read
        samples = Compiler.get_iterator()
        decode_c, resize_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, decoded, windows = my_storage
            for k in samples(len(batch_indices)):
                field = metadata[batch_indices[k]]
                data = read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    image = decoded[k]
                    decode_c(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                left, top, right, bottom, flip = windows[k]
                out = destination[k]
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
