"""DALI backend: JPEG decode on the GPU (nvJPEG through DALI's `mixed` decoders), or on CPU threads without one.
Reads an ImageFolder tree or a sharded split (local or s3://: loaders/shard_source.py, and _ShardBytes below).

- Order: each pass (an epoch, or an evaluation) gets a pipeline whose file reader walks that pass's files in our own
  order (epoch_order + shard, as every backend), so labels, order and sharding match the other backends exactly,
  while DALI reads ahead in its own threads as when used by hand (faster than a Python external source of the files'
  bytes: BENCHMARKS.md, DALI). The pass's resolution and batch size are simply those it is built with, so `reconfigure`
  needs no rebuild of its own.
- Crops: each training sample's random-resized-crop box and flip come from (seed, epoch, index), a batch's at once
  (loaders/augment.py: a few array operations, no Python per sample on the thread that feeds DALI), from the image
  size verification read in the header, and are fed in step with the reader's batches (external source): the same
  crops as the other backends, and a resumed epoch
  (set_epoch(epoch, first_step)) gets the uninterrupted pass's crops. The decoder decodes only the window
  (`decoders.image_slice`: ROI decode in libjpeg-turbo, and in nvJPEG on the GPU), then it is resized and flipped.
  Eval: resize + centre crop. EXIF orientation is ignored, as by the other backends (DALI would apply it by default).
- Between passes: when a pass has been read to its end, the pipeline of the next one (the next epoch, the way the
  training loop asks for it; for evaluation the same pass again) is built and starts reading and decoding at once,
  while the caller evaluates or checkpoints, as DALI's own reader reads on into its next epoch. If the next pass is
  another one after all (a stage's new shape, a resumed epoch), that pipeline is dropped and the right one built.
  A pass left early prepares nothing.
- Memory: a pipeline lives for its pass, DALI's memory pools for the process. At most one training pipeline and one
  evaluation pipeline exist at a time (the pass's own is dropped before the next one is built), each holding
  nvJPEG's per-thread buffers (with the padding below, ~200 MiB of device and ~270 MiB of pinned memory per decode
  thread). Pools are never released (no ReleaseUnusedMemory): the next pipeline takes its buffers and batches from
  the blocks the previous one gave back, so once the pools have grown to the largest stage, epochs take their memory
  from them rather than from CUDA. On GPU the device is synchronised once when a pipeline goes, so the next one does
  not start while the last frees are pending and grow the pool (DALI #5087).
- Hand-over without a host wait: on GPU the pipeline's outputs are bound to torch's current CUDA stream
  (`outputs(stream)`: no host wait), and the batch is copied into a torch tensor on that same stream (feed_ndarray
  with a stream copies asynchronously). A copy rather than DLPack: the batch then lives in torch's caching allocator,
  and DALI's pool does not grow by whatever batches the training step still holds. Decoding on CPU for a CUDA
  device, the batch is copied into pinned memory, so its host->device copy does not block. Labels go to the device
  once per epoch (one copy of the epoch's label vector); each batch takes a view of it.
- A JPEG kept because its 1/8-scale decode fits one decode's budget (dataset_tools/image_rules.py) would be
  decoded at full size by DALI, which has no DCT scaling: the reader reads it from a reduced copy
  (loaders/reduced_jpegs.py), its crops drawn on the copy's size.
- Files DALI cannot decode would kill the pipeline, so they leave the sample list up front (dataset_tools/verify.py,
  cached, once per node) and are reported like the other backends' skips. A pipeline that fails anyway says
  whether it ran out of memory or met a file it could not decode.
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy, feed_ndarray

from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools.image_rules import KEPT_FORMATS
from fastimagenet.dataset_tools.scan import scan_image_folder
from fastimagenet.dataset_tools.verify import kept_samples
from fastimagenet.loaders.augment import Augmentation, crop_windows
from fastimagenet.loaders.base import (LoaderSpec, batches_per_epoch, check_batch_fits, epoch_order, host_to_device,
                                       rank_share, to_device_nchw)
from fastimagenet.loaders.reduced_jpegs import within_budget
from fastimagenet.loaders.shard_source import ShardSource, is_shard_dataset

# What this backend reads, as PIL names the formats: the formats every backend keeps (DALI's decoders read these and
# JPEG 2000, but not GIF).
DALI_FORMATS = KEPT_FORMATS

# nvJPEG buffer padding for full-size ImageNet, as in NVIDIA's DALI ResNet-50 example: large enough for any of its
# photos, so no decode thread re-allocates mid-run. DALI 2.4 takes, per decode thread, one device buffer and two
# pinned host buffers of this size from its pools when the decoder is built (and keeps them pooled after).
DEVICE_MEMORY_PADDING = 211_025_920  # bytes (~201 MiB)
HOST_MEMORY_PADDING = 140_544_512  # bytes (~134 MiB)

# What DALI 2.4's messages say when an allocation fails: its allocators ("Can't allocate N bytes on device D.",
# "CUDA allocation failed"), CUDA itself, std::bad_alloc, and nvImageCodec's status 5 / 15 (allocator failure).
_OUT_OF_MEMORY = ("can't allocate", "cuda allocation failed", "out of memory", "cudaerrormemoryallocation",
                  "bad_alloc", "nvimagecodec failure: '#5'", "nvimagecodec failure: '#15'")


def decode_device(spec: LoaderSpec) -> str:
    """'mixed' (nvJPEG, output on the GPU) or 'cpu', from loader.dali.device (its option ranges are checked with
    the rest of the config)."""
    choice = spec.options.dali.device
    if choice == "auto":
        return "mixed" if spec.device.type == "cuda" else "cpu"
    if choice == "gpu" and not torch.cuda.is_available():
        raise UserError("loader.dali.device=gpu needs a CUDA device; use loader.dali.device=cpu on this machine")
    return "mixed" if choice == "gpu" else "cpu"


def decoder_options(device: str, hw_decoder_load: float) -> dict:
    """Arguments of DALI's image decoders: RGB with EXIF orientation ignored (as torchvision's ImageFolder and FFCV
    do; DALI applies it by default), and on the GPU the hardware decoder's share and the nvJPEG buffer padding."""
    options = dict(device=device, output_type=types.RGB, adjust_orientation=False)
    if device == "mixed":
        options.update(hw_decoder_load=hw_decoder_load,  # share sent to the A100/H100 hardware JPEG decoder
                       device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING)
    return options


def train_images(encoded, anchors, shapes, resolution: int, decoder: dict, flips=None):
    """Our training graph, from encoded bytes to HWC uint8 RGB: each sample's crop window (anchor and shape in whole
    pixels, x first) decoded on its own, resized to the resolution, and flipped where its flag says (no flags: no
    flips, with data.flip=false)."""
    images = fn.decoders.image_slice(encoded, anchors, shapes, **decoder)  # integer inputs: absolute pixels
    images = fn.resize(images, resize_x=resolution, resize_y=resolution)
    return images if flips is None else fn.flip(images, horizontal=flips)


def eval_images(encoded, resolution: int, crop_ratio: float, decoder: dict):
    """Evaluation, from encoded bytes to HWC uint8 RGB: the shorter side resized to resolution / crop_ratio, then the
    centre crop (loaders/augment.py)."""
    images = fn.decoders.image(encoded, **decoder)
    images = fn.resize(images, resize_shorter=resolution / crop_ratio)
    return fn.crop(images, crop=(resolution, resolution))  # centred by default


class _CropWindows:
    """The external source of a training pass (whole batches only): for its batch k, each sample's crop window
    (anchors and shapes, x first, int32) and, with data.flip, flip flag, drawn as the torchvision backend draws them
    (loaders/augment.py). After the pass's last batch it raises StopIteration, so the pipeline schedules no work
    past the pass."""

    def __init__(self, indices: list[int], sizes: np.ndarray, batch_size: int, seed: int, epoch: int,
                 augment: Augmentation):
        self.indices, self.sizes, self.batch_size = indices, sizes, batch_size
        self.seed, self.epoch, self.augment = seed, epoch, augment

    def outputs(self) -> int:
        return 3 if self.augment.flip else 2  # DALI warns about (and computes) an output nothing reads

    def __call__(self, k: int) -> tuple[np.ndarray, ...]:
        batch = self.indices[k * self.batch_size : (k + 1) * self.batch_size]
        if not batch:
            raise StopIteration
        windows = crop_windows(batch, self.sizes, self.seed, self.epoch, self.augment)
        anchors = np.ascontiguousarray(windows[:, :2])
        return (anchors, windows[:, 2:4] - anchors, np.ascontiguousarray(windows[:, 4]))[: self.outputs()]


class _ShardBytes:
    """The external source of a pass over a sharded split: batch k's encoded JPEGs, read from the shards' local
    files in the pass's order (each batch once its shards are fetched: ShardSource.fetched), a last short batch
    padded with repeats of its last sample as the file reader pads. DALI's webdataset reader is not used: it reads
    each shard in its own order (its shuffle is its own buffer and seed, and it cannot start mid-epoch), where the
    loader contract needs our order and an exact resume; on local files reading the bytes here costs a pread each.
    """

    def __init__(self, shards: ShardSource, indices: list[int], batch_size: int):
        self.shards, self.batch_size = shards, batch_size
        self.batches = shards.fetched(indices[start : start + batch_size]
                                      for start in range(0, len(indices), batch_size))

    def __call__(self, _k: int) -> list[np.ndarray]:
        batch = next(self.batches, None)
        if batch is None:
            raise StopIteration
        batch = batch + batch[-1:] * (self.batch_size - len(batch))
        return [np.frombuffer(self.shards.read(i), dtype=np.uint8) for i in batch]


# Default decode threads of a pipeline that decodes on the GPU (train, val). There nvJPEG does the pixel work on
# the device (the A100/H100 hardware decoder a share of it); the CPU threads parse and, on nvJPEG's hybrid path, run
# the Huffman stage (~1 ms an ImageNet JPEG: 6 threads keep up with ~6,000 images/s even with no hardware
# decoder). Each thread holds its own padded nvJPEG buffers (~200 MiB device, ~270 MiB pinned, above), so the CPU
# share's default (28 + 14 threads per rank on a 224-thread 8-GPU node: ~8 GiB device and ~11 GiB pinned per rank)
# would buy memory, not speed. Validation runs between epochs and gets fewer.
GPU_DECODE_THREADS = {True: 6, False: 3}


def decode_threads(spec: LoaderSpec, decode: str) -> int:
    """A pipeline's threads: loader.dali.threads, else loader.workers, else the process's share of the CPUs (half for
    val), at most GPU_DECODE_THREADS when decoding on the GPU."""
    if spec.options.dali.threads or spec.options.workers:
        return spec.options.dali.threads or spec.options.workers
    share = spec.workers()
    return min(share, GPU_DECODE_THREADS[spec.train]) if decode == "mixed" else share


@dataclass(frozen=True)
class Handover:
    """How batches pass from DALI to torch without the host waiting for the device."""

    gpu: torch.device | None  # DALI decodes on this GPU and hands over on its current torch stream; None: on CPU
    pin: bool  # host output bound for a CUDA device: copied into pinned memory, so its copy to the device is async


def handover(decode: str, device: torch.device) -> Handover:
    """`decode` is decode_device's answer, `device` the training device."""
    if decode == "mixed":
        return Handover(gpu=device if device.type == "cuda" else torch.device("cuda"), pin=False)
    return Handover(gpu=None, pin=device.type == "cuda")


def output_stream(hand: Handover) -> torch.cuda.Stream | None:
    """The stream DALI binds a batch to and the copy into torch runs on: torch's current stream on the decoding GPU,
    so the training step that follows is ordered after both without the host waiting. None: host outputs."""
    return None if hand.gpu is None else torch.cuda.current_stream(hand.gpu)


# A pipeline's threads exist only in the process that built it. A forked child (a DataLoader worker, a writer
# process) inherits the Python object but none of the threads, and destroying it there crashes or waits for them for
# ever (seen: a worker's garbage collector freeing a pipeline left in a reference cycle). So the pipelines a process
# builds are noted, and a forked child keeps those it inherited alive: fork children end with os._exit, which
# destroys nothing.
_BUILT: weakref.WeakSet[Pipeline] = weakref.WeakSet()
_INHERITED: list[Pipeline] = []


def _keep_inherited_pipelines() -> None:
    _INHERITED.extend(_BUILT)


os.register_at_fork(after_in_child=_keep_inherited_pipelines)


def _new_pipeline(spec: LoaderSpec, batch_size: int, seed: int) -> Pipeline:
    decode = decode_device(spec)
    gpu = handover(decode, spec.device).gpu
    device_id = None if gpu is None else torch.cuda.current_device() if gpu.index is None else gpu.index
    # exec_dynamic is DALI's default executor, named because outputs on a CUDA stream (`outputs(stream)`) require it.
    pipe = Pipeline(batch_size=batch_size, num_threads=decode_threads(spec, decode), device_id=device_id, seed=seed,
                    prefetch_queue_depth=spec.options.dali.prefetch, exec_dynamic=True)
    _BUILT.add(pipe)
    return pipe


def _to_torch(images, hand: Handover, stream: torch.cuda.Stream | None) -> torch.Tensor:
    """DALI's HWC batch copied into a torch tensor: on the GPU asynchronously on `stream`, the stream DALI bound it
    to; on the host into pinned memory when it goes on to a GPU."""
    tensor = images.as_tensor()
    out = torch.empty(tensor.shape(), dtype=torch.uint8, device="cpu" if hand.gpu is None else hand.gpu,
                      pin_memory=hand.pin)
    feed_ndarray(tensor, out, cuda_stream=stream)
    return out


def dali_failure(message: str) -> str | None:
    """What a DALI pipeline error reports: "out of memory", "decode" (a decoder failed on a file) or None."""
    lowered = message.lower()
    if any(marker in lowered for marker in _OUT_OF_MEMORY):
        return "out of memory"
    if "fn.decoders." in message:  # "Error in CPU/MIXED operator `nvidia.dali.fn.decoders.image...`"
        return "decode"
    return None


def _what_dali_met(message: str) -> str:
    """The line of a DALI error that says what happened (DALI wraps it in the operator's traceback)."""
    lines = [line.strip() for line in message.rsplit("encountered:", 1)[-1].splitlines()]
    lines = [line for line in lines if line and "no longer valid" not in line]
    return lines[0] if lines else message.strip()


def pipeline_error(exc: Exception, files: list[str]) -> Exception:
    """The error to raise for a pipeline that failed while building or running on `files` (a batch's first ones):
    running out of memory says so, a decode failure names the file; anything else stays as DALI raised it."""
    message = str(exc)
    kind = "out of memory" if isinstance(exc, MemoryError) else dali_failure(message)
    if kind == "out of memory":
        return UserError(f"DALI ran out of memory ({_what_dali_met(message)}): lower the batch size, "
                         "loader.dali.threads (on GPU each decode thread pools ~200 MiB of device and ~270 MiB of "
                         "pinned memory) or loader.dali.prefetch")
    if kind == "decode":
        named = re.search(r"Failed to decode sample #\d+ : (.+)", message)
        if named:
            return UserError(f"{named.group(1).strip()}: DALI could not decode this image (changed since it was "
                             "verified?)")
        return UserError(f"DALI could not decode an image at or just after [{', '.join(files)}, ...] (changed "
                         f"since it was verified?): {_what_dali_met(message)}")
    return exc


@dataclass(frozen=True)
class _Pass:
    """What a pass reads: the epoch (it draws the order and the crops; evaluation reads the same in every epoch,
    so 0), the step it starts at, and its shape."""

    epoch: int
    first_step: int
    resolution: int
    batch_size: int


class DaliLoader:
    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self._decode_device = decode_device(spec)
        self._handover = handover(self._decode_device, spec.device)
        self._shards = ShardSource(spec) if is_shard_dataset(spec.path) else None
        if self._shards is not None:  # a sharded split: convert kept only decodable images within its size limit
            self.skipped, self.classes = self._shards.skipped, self._shards.classes
            self._paths, self._sizes = self._shards.names, self._shards.sizes
            self._labels = torch.from_numpy(self._shards.index.labels)
        else:
            scan = scan_image_folder(spec.path, spec.classes)
            # The files every backend keeps: DALI never meets one it cannot decode, nor a decompression bomb. Their
            # sizes (from the headers) place the crop windows; kept as (width, height) rows of an array, where
            # Python tuples would take ~140 MB per process on ImageNet.
            samples, self.skipped, sizes = kept_samples(scan, spec.path, spec.strict, spec.local_rank)
            self.classes = scan.classes
            self._paths = [path for path, _ in samples]  # the dataset's files, which errors name
            # what the file reader reads: the same files, but a JPEG above one decode's budget from a reduced copy
            self._files, self._sizes = within_budget(self._paths, np.array(sizes, dtype=np.int32))
            self._labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self.epoch, self.resolution, self.batch_size = 0, spec.resolution, spec.per_rank_batch()
        self.first_step = 0
        self._check_fits()
        self._pipe = None  # the running pass's pipeline
        self._prepared: tuple[_Pass, Pipeline] | None = None  # the next pass's, started when the last one ended

    def _check_fits(self) -> None:
        if self.spec.train:
            check_batch_fits(self.batch_size, len(self._paths) // self.spec.world_size, self.spec.path,
                             self.spec.batch_setting())

    def _indices(self, epoch: int) -> torch.Tensor:
        if self._shards is not None:  # a sharded split has an order of its own (loaders/shard_source.py)
            return torch.from_numpy(self._shards.order(epoch))
        return rank_share(epoch_order(len(self._paths), self.spec.seed, epoch, self.spec.train), self.spec)

    def __len__(self) -> int:
        return batches_per_epoch(len(self._indices(self.epoch)), self.batch_size, self.spec.train)

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        self.epoch, self.first_step = epoch, first_step

    def reconfigure(self, resolution: int, batch_size: int) -> None:
        self.resolution, self.batch_size = resolution, self.spec.per_rank_batch(batch_size)
        self._check_fits()

    def _pass(self, epoch: int, first_step: int) -> _Pass:
        return _Pass(epoch if self.spec.train else 0, first_step, self.resolution, self.batch_size)

    def _pass_indices(self, run: _Pass) -> list[int]:
        """The samples a pass reads, in order: a resumed epoch reads only those it has not had yet."""
        indices = self._indices(run.epoch)
        batches = batches_per_epoch(len(indices), run.batch_size, self.spec.train)
        return indices.tolist()[run.first_step * run.batch_size : batches * run.batch_size]

    def _pools_settle(self) -> None:
        """Called once a pipeline is gone (DALI's memory pools stay for the next one: see the module notes)."""
        if self._handover.gpu is not None:
            # sync, once per pipeline: its last stream-ordered frees (and our copies out of its buffers) are complete
            # before the next pipeline allocates, so it reuses those blocks instead of growing the pool.
            torch.cuda.synchronize(self._handover.gpu)

    def _release_pipeline(self) -> None:
        """Drop the running pass's pipeline."""
        if self._pipe is not None:
            self._pipe = None
            self._pools_settle()

    def _epoch_labels(self, indices: list[int]) -> torch.Tensor:
        """The epoch's labels on the training device in one copy (batches take views): no per-step host->device
        copy, and from pinned memory on a GPU, so this one does not block the host either."""
        return host_to_device(self._labels[indices], self.spec.device)

    def _started_pipeline(self, run: _Pass, indices: list[int]) -> Pipeline:
        """A pipeline whose file reader walks the pass's files in our order, fed each training sample's crop window
        in step with it; built (milliseconds) and already reading and decoding its first batches."""
        spec = self.spec
        decoder = decoder_options(self._decode_device, spec.options.dali.hw_decoder_load)
        pipe = _new_pipeline(spec, run.batch_size, spec.seed)
        with pipe:
            # A last batch short of the batch size is padded with repeats of the last file; __iter__ keeps only the
            # real samples.
            if self._shards is not None:
                encoded = fn.external_source(_ShardBytes(self._shards, indices, run.batch_size), batch=True,
                                             dtype=types.UINT8, ndim=1)
            else:
                encoded, _ = fn.readers.file(files=[self._files[i] for i in indices], random_shuffle=False,
                                             pad_last_batch=True)
            if spec.train:
                windows = _CropWindows(indices, self._sizes, run.batch_size, spec.seed, run.epoch, spec.augment)
                crops = fn.external_source(windows, num_outputs=windows.outputs(), batch=True, dtype=types.INT32,
                                           ndim=[1, 1, 0][: windows.outputs()])
                images = train_images(encoded, *crops[:2], run.resolution, decoder, *crops[2:])
            else:
                images = eval_images(encoded, run.resolution, spec.augment.crop_ratio, decoder)
            pipe.set_outputs(images)
        try:
            pipe.build()  # on GPU the decoder takes its nvJPEG buffers here: the first place memory can run out
            pipe.schedule_run()  # fills DALI's prefetch queue: the reading and decoding start now
        except (RuntimeError, MemoryError) as exc:
            raise pipeline_error(exc, [self._paths[i] for i in indices[:3]]) from None
        return pipe

    def _pipeline_for(self, run: _Pass, indices: list[int]) -> Pipeline:
        """The pipeline prepared for this pass, or a new one (a pipeline prepared for another pass goes first)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            if prepared[0] == run:
                return prepared[1]
            del prepared
            self._pools_settle()
        return self._started_pipeline(run, indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        run = self._pass(self.epoch, self.first_step)
        size, indices = run.batch_size, self._pass_indices(run)
        labels = self._epoch_labels(indices)
        self._release_pipeline()  # a pass left early by a consumer that kept its iterator
        self._pipe = self._pipeline_for(run, indices)
        try:
            for start in range(0, len(indices), size):
                count = min(size, len(indices) - start)
                stream = output_stream(self._handover)
                try:
                    if start:
                        self._pipe.schedule_run()  # one more batch in flight for each one taken
                    (images,) = self._pipe.outputs(stream)
                except (RuntimeError, MemoryError) as exc:
                    raise pipeline_error(exc, [self._paths[i] for i in indices[start : start + 3]]) from None
                images = _to_torch(images, self._handover, stream)[:count]
                yield to_device_nchw(images, labels[start : start + count], self.spec.device)
        finally:  # the pass's pipeline (and anything it prefetched) goes with the pass
            self._release_pipeline()
        # Read to its end: the next pass starts now (see the module notes)
        following = self._pass(self.epoch + 1, 0)
        self._prepared = following, self._started_pipeline(following, self._pass_indices(following))


class _RawIterator:
    """DALI used by hand: its file reader shuffling and sharding, its random crop and flip, its PyTorch iterator
    copying out."""

    def __init__(self, spec: LoaderSpec):
        scan = scan_image_folder(spec.path, spec.classes)
        decoder = decoder_options(decode_device(spec), spec.options.dali.hw_decoder_load)
        pipe = _new_pipeline(spec, spec.per_rank_batch(), seed=spec.seed)
        with pipe:
            encoded, labels = fn.readers.file(
                files=[path for path, _ in scan.samples], labels=[label for _, label in scan.samples],
                random_shuffle=spec.train, shard_id=spec.rank, num_shards=spec.world_size, name="reader")
            if spec.train:
                images = fn.decoders.image_random_crop(encoded, random_area=list(spec.augment.scale),
                                                       random_aspect_ratio=list(spec.augment.ratio), num_attempts=10,
                                                       **decoder)
                images = fn.resize(images, resize_x=spec.resolution, resize_y=spec.resolution)
                if spec.augment.flip:
                    images = fn.flip(images, horizontal=fn.random.coin_flip())
            else:
                images = eval_images(encoded, spec.resolution, spec.augment.crop_ratio, decoder)
            pipe.set_outputs(images, labels)
        policy = LastBatchPolicy.DROP if spec.train else LastBatchPolicy.PARTIAL
        self._iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name="reader",
                                             last_batch_policy=policy, auto_reset=True)
        self._device = spec.device

    def __iter__(self):
        for (batch,) in self._iterator:
            yield to_device_nchw(batch["images"], batch["labels"].squeeze(-1).long(), self._device)


def raw_pipeline(spec: LoaderSpec) -> _RawIterator:
    """The same work written the way DALI's documentation teaches it: the baseline DaliLoader must keep up with."""
    return _RawIterator(spec)
