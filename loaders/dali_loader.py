"""DALI backend: JPEG decode on the GPU (nvJPEG through DALI's `mixed` decoders), or on CPU threads without one.

- Order: each epoch gets a pipeline whose file reader walks that epoch's files in our own order (epoch_order +
  shard, as every backend), so labels, order and sharding match the other backends exactly, while DALI reads ahead
  in its own threads as when used by hand (a Python external source was ~5% slower on cpu-2c). Building a pipeline
  takes milliseconds; the epoch's resolution and batch size are simply those it is built with, so `reconfigure`
  needs no rebuild of its own. The pipeline, and on GPU the pooled memory it held, is released with its epoch.
- Train: the random-resized-crop is fused into the decode (`decoders.image_random_crop`: only the crop's pixels
  are decoded), then resized to the epoch's resolution and flipped. Eval: resize + centre crop. EXIF orientation
  is ignored, as by the other backends (DALI would apply it by default).
- Files DALI cannot decode would kill the pipeline, so they leave the sample list up front (dataset_tools/verify.py,
  cached, once per node) and are reported like the other backends' skips.
"""

from __future__ import annotations

from typing import Iterator

import torch
from nvidia.dali import fn, types
from nvidia.dali.backend import ReleaseUnusedMemory, TensorGPU
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy, feed_ndarray

from dataset_tools.scan import scan_image_folder
from dataset_tools.verify import verified_samples
from fastimagenet.config import DataConfig
from fastimagenet.errors import UserError
from loaders.base import LoaderSpec, batches_per_epoch, check_batch_fits, epoch_order, rank_share, to_device_nchw

# What DALI's image decoders read, as PIL names the formats (GIF, for one, is not among them).
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"})


def decode_device(spec: LoaderSpec) -> str:
    """'mixed' (nvJPEG, output on the GPU) or 'cpu', from loader.dali.device (its option ranges are checked with
    the rest of the config)."""
    choice = spec.options.dali.device
    if choice == "auto":
        return "mixed" if spec.device.type == "cuda" else "cpu"
    if choice == "gpu" and not torch.cuda.is_available():
        raise UserError("loader.dali.device=gpu needs a CUDA device; use loader.dali.device=cpu on this machine")
    return "mixed" if choice == "gpu" else "cpu"


def augmented(encoded, train: bool, resolution: int, augment: DataConfig, device: str, hw_decoder_load: float):
    """The DALI graph of our augmentation (loaders/augment.py) from encoded bytes to HWC uint8 RGB."""
    # EXIF orientation ignored, as torchvision's ImageFolder and FFCV do (DALI applies it by default)
    decoder = dict(device=device, output_type=types.RGB, adjust_orientation=False)
    if device == "mixed":
        decoder["hw_decoder_load"] = hw_decoder_load  # share sent to the A100/H100 hardware JPEG decoder
    if not train:
        images = fn.decoders.image(encoded, **decoder)
        images = fn.resize(images, resize_shorter=resolution / augment.crop_ratio)
        return fn.crop(images, crop=(resolution, resolution))  # centred by default
    images = fn.decoders.image_random_crop(encoded, random_area=list(augment.scale),
                                           random_aspect_ratio=list(augment.ratio), num_attempts=10, **decoder)
    images = fn.resize(images, resize_x=resolution, resize_y=resolution)
    if augment.flip:
        images = fn.flip(images, horizontal=fn.random.coin_flip())
    return images


def _threads(spec: LoaderSpec) -> int:
    return spec.options.dali.threads or spec.workers()


def _new_pipeline(spec: LoaderSpec, batch_size: int, seed: int) -> Pipeline:
    device = decode_device(spec)
    device_id = None
    if device == "mixed":
        device_id = spec.device.index if spec.device.type == "cuda" and spec.device.index is not None \
            else torch.cuda.current_device()
    return Pipeline(batch_size=batch_size, num_threads=_threads(spec), device_id=device_id, seed=seed,
                    prefetch_queue_depth=spec.options.dali.prefetch)


def _to_torch(images, device: torch.device) -> torch.Tensor:
    """DALI's HWC batch copied into a fresh torch tensor (DALI reuses its output buffers on the next run)."""
    tensor = images.as_tensor()
    on_gpu = isinstance(tensor, TensorGPU)
    pin = not on_gpu and device.type == "cuda"
    out = torch.empty(tensor.shape(), dtype=torch.uint8, device=device if on_gpu else "cpu", pin_memory=pin)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device) if on_gpu else None)
    return out


class DaliLoader:
    def __init__(self, spec: LoaderSpec):
        scan = scan_image_folder(spec.path, spec.classes)
        samples, unreadable = verified_samples(scan, DALI_FORMATS, spec.local_rank)
        if unreadable and spec.strict:
            path, reason = next(iter(unreadable.items()))
            raise UserError(f"{path}: unreadable image ({reason}); set data.strict=false to skip such files")
        if not samples:
            raise UserError(f"{spec.path}: none of the {len(scan.samples)} images can be decoded")
        self.spec, self.classes, self.skipped = spec, scan.classes, dict(unreadable)
        self._decode_device = decode_device(spec)
        if unreadable:
            listing = "\n".join(f"  {path}: {reason}" for path, reason in list(unreadable.items())[:10])
            print(f"warning: {len(unreadable)} unreadable images left out of {spec.path}:\n{listing}")
        self._paths = [path for path, _ in samples]
        self._labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self.epoch, self.resolution, self.batch_size = 0, spec.resolution, spec.per_rank_batch()
        self._check_fits()
        self._pipe = None

    def _check_fits(self) -> None:
        if self.spec.train:
            check_batch_fits(self.batch_size, len(self._paths) // self.spec.world_size, self.spec.path)

    def _indices(self) -> torch.Tensor:
        return rank_share(epoch_order(len(self._paths), self.spec.seed, self.epoch, self.spec.train), self.spec)

    def __len__(self) -> int:
        return batches_per_epoch(len(self._indices()), self.batch_size, self.spec.train)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def reconfigure(self, resolution: int, batch_size: int) -> None:
        self.resolution, self.batch_size = resolution, self.spec.per_rank_batch(batch_size)
        self._check_fits()

    def _release_pipeline(self) -> None:
        if self._pipe is None:
            return
        self._pipe = None
        if self._decode_device == "mixed":  # DALI pools GPU memory: give what the old pipeline held back to torch
            ReleaseUnusedMemory()

    def _epoch_pipeline(self, indices: list[int]) -> Pipeline:
        """A pipeline whose file reader walks this epoch's files in our order. Built per epoch (milliseconds): DALI's
        reader then reads ahead in its own threads, as it does when used by hand."""
        spec = self.spec
        # Crops and flips are seeded per (seed, rank, epoch): reproducible, and no two ranks or epochs repeat.
        seed = ((spec.seed * 1_000 + spec.rank) * 100_003 + self.epoch) % 2**31
        pipe = _new_pipeline(spec, self.batch_size, seed)
        with pipe:
            # The last batch is padded with repeats of the last file; __iter__ keeps only the real samples.
            encoded, _ = fn.readers.file(files=[self._paths[i] for i in indices], random_shuffle=False,
                                         pad_last_batch=True)
            pipe.set_outputs(augmented(encoded, spec.train, self.resolution, spec.augment, self._decode_device,
                                       spec.options.dali.hw_decoder_load))
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices().tolist()
        batches = [indices[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]
        self._release_pipeline()
        self._pipe = self._epoch_pipeline(indices)
        try:
            for batch in batches:
                try:
                    (images,) = self._pipe.run()
                except RuntimeError as exc:  # a file changed on disk since it was verified
                    files = ", ".join(self._paths[i] for i in batch[:3])
                    raise UserError(f"DALI could not decode an image at or just after [{files}, ...] (changed since "
                                    f"it was verified?): {str(exc).strip().splitlines()[-1]}") from None
                images = _to_torch(images, self.spec.device)[: len(batch)]
                yield to_device_nchw(images, self._labels[batch], self.spec.device)
        finally:  # the epoch's pipeline (and anything it prefetched) goes with the epoch
            self._release_pipeline()


class _RawIterator:
    """DALI used by hand: its file reader shuffling and sharding, its PyTorch iterator copying out."""

    def __init__(self, spec: LoaderSpec):
        scan = scan_image_folder(spec.path, spec.classes)
        pipe = _new_pipeline(spec, spec.per_rank_batch(), seed=spec.seed)
        with pipe:
            encoded, labels = fn.readers.file(
                files=[path for path, _ in scan.samples], labels=[label for _, label in scan.samples],
                random_shuffle=spec.train, shard_id=spec.rank, num_shards=spec.world_size, name="reader")
            images = augmented(encoded, spec.train, spec.resolution, spec.augment, decode_device(spec),
                               spec.options.dali.hw_decoder_load)
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
