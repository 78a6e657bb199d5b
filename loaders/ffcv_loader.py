"""FFCV backend: reads a .beton written by `fastimagenet convert`; JIT-compiled decode threads, no worker processes.

- Train: each sample's crop window and flip drawn from (seed, epoch, index) as every backend draws them
  (loaders/augment.py), handed to our decoder (loaders/ffcv_window_decoder.py), which crops, resizes straight to the
  epoch's resolution and flips as FFCV's own random-resized-crop decoder and flip would: reproducible crops, and a
  resumed epoch gets the uninterrupted pass's samples *and* crops. Eval: FFCV's centre-crop decoder with our crop
  ratio. uint8 all the way; channels-last NCHW on the device.
- The FFCV Loader (and its JIT compile, seconds) is built once. `reconfigure` assigns the decoder's `output_size`
  and the Loader's `batch_size`, which FFCV reads when it allocates the next epoch's buffers: no rebuild per stage.
- Order: our own per-epoch order (epoch_order + shard, as every backend) through FFCV's traversal-order interface,
  or FFCV's quasi-random order (reads pages in clusters; for datasets larger than RAM) sharded the same way. Ranks
  take disjoint shards from rank/world_size alone; FFCV's own `distributed=True` would need an initialised process
  group (it wraps torch's DistributedSampler), which the training script has under torchrun anyway, but sharding
  here keeps the order identical to the other backends and also works with quasi-random order, which FFCV's
  distributed mode does not support.
- As in FFCV, a batch lives in a buffer that is reused a few batches later: consume it before asking for more
  (the training loop does). On a GPU a slot's pinned host buffer is reused only once the copy out of it has run
  (FFCV guards only the device buffer), and host buffers FFCV could not pin are reported.
- Damage: the file's tables are checked when it opens (dataset_tools/beton_check.py), so FFCV never follows a pointer
  a bad disk or a torn copy changed; with `loader.ffcv.verify`, the epoch thread checks each batch's records
  against convert's checksums before they are decoded (dataset_tools/record_sums.py).
- FFCV's epoch thread is given the loader's GPU as its current device (_DeviceEpochIterator), so a torchrun
  process never opens a CUDA context on another process's GPU.
- Threads: FFCV's `Compiler.set_num_threads` sets numba's *and torch's* thread count of the thread that calls it
  (both are per thread). FFCV calls it when first imported (1), when a Loader is built and in each epoch thread;
  the epoch thread's call is the one the decode needs. The importing and building thread's torch count is put back
  (`torch_threads_kept`), so the training step and evaluation keep torch's threads whatever the loaders' worker
  counts are.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from contextlib import suppress
from pathlib import Path
from queue import Empty, Full
from typing import Callable, Iterator

import numba
import numpy as np
import torch

from fastimagenet.common.errors import UserError
from fastimagenet.common.threads import importing_ffcv, torch_threads_kept
from fastimagenet.dataset_tools import object_store
from fastimagenet.dataset_tools.beton_file import Beton
from fastimagenet.dataset_tools.convert import ConvertOptions, convert_split, read_sidecar
from fastimagenet.dataset_tools.object_cache import ObjectCache
from fastimagenet.dataset_tools.record_sums import stored_sums
from fastimagenet.loaders.augment import crop_windows
from fastimagenet.loaders.base import LoaderSpec, check_batch_fits, epoch_order, rank_share

with importing_ffcv():  # importing FFCV sets this thread's torch count to 1 (see the module notes)
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader as _FfcvLoader
    from ffcv.loader import OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.traversal_order import QuasiRandom
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

    from fastimagenet.loaders.ffcv_window_decoder import WindowCropDecoder


def beton_path(spec: LoaderSpec) -> Path:
    """The .beton to read: spec.path, or for an s3:// URL its local copy (and its sidecar's), fetched once into
    the node's cache (loader.cache_dir) and verified."""
    if not spec.path:
        raise UserError("no .beton file given (set data.train / data.val)")
    if object_store.is_remote(spec.path):
        return ObjectCache(spec.options.cache_dir, spec.options.cache_gb).copy_of(spec.path, companions=(".json",))
    path = Path(spec.path)
    if path.is_dir():
        raise UserError(f"{path}: the ffcv loader reads a .beton file, not a folder; write one with "
                        f"`fastimagenet convert {path} {path.with_suffix('.beton')}`")
    if not path.exists():
        raise UserError(f"{path}: file does not exist (write it with `fastimagenet convert`)")
    return path


def demo_data(home: Path) -> tuple[Path, Path]:
    """The demo's Fashion-MNIST as this backend reads it: train and val .beton files, written once under `home`."""
    from fastimagenet.dataset_tools import fashion_mnist

    return fashion_mnist.fashion_mnist_betons(home / "fashion-mnist-ffcv")


def data_from_folder(folder: str | Path, scratch: str | Path, workers: int = 0) -> Path:
    """The images of the ImageFolder `folder` as this backend reads them: a .beton written once into the directory
    `scratch` the way FFCV's ImageNet example writes one (JPEG, longer side at most 512 px, quality 90:
    ConvertOptions' defaults; `workers` writer processes, 0: one per core). A .beton given as `folder` is kept."""
    if str(folder).endswith(".beton"):
        return Path(folder)
    beton = Path(scratch) / f"{Path(folder).name}.beton"
    if not beton.exists():
        convert_split(folder, beton, ConvertOptions(workers=workers))
    return beton


def source_folder(path: str | Path) -> Path | None:
    """The ImageFolder a .beton was converted from (its sidecar says); None for a path that is not a .beton."""
    if not str(path).endswith(".beton"):
        return None
    source = read_sidecar(path).get("source")
    if source is None:  # written from arrays (the demo's Fashion-MNIST), not by `convert`
        raise UserError(f"{path} was not converted from an image folder: give the folder with --data")
    return Path(source)


def _decoder(spec: LoaderSpec):
    size = (spec.resolution, spec.resolution)
    return WindowCropDecoder(size) if spec.train else CenterCropRGBImageDecoder(size, ratio=spec.augment.crop_ratio)


def _pipelines(spec: LoaderSpec, decoder, flip: bool = False) -> dict:
    """decode (+ FFCV's flip) -> tensor (-> device) -> NCHW channels-last view; labels as int64 vectors."""
    image = [decoder] + ([RandomHorizontalFlip()] if flip else []) + [ToTensor()]
    label = [IntDecoder(), ToTensor(), Squeeze(1)]
    if spec.device.type != "cpu":
        image.append(ToDevice(spec.device, non_blocking=True))
        label.append(ToDevice(spec.device, non_blocking=True))
    return {"image": image + [ToTorchImage(channels_last=True, convert_back_int16=False)], "label": label}


def _ffcv_loader(spec: LoaderSpec, path: Path, pipelines: dict, order: OrderOption, os_cache: bool) -> _FfcvLoader:
    workers = spec.workers()
    if workers > numba.config.NUMBA_NUM_THREADS:  # FFCV hands its thread count to numba.set_num_threads
        raise UserError(f"loader.workers={workers}: FFCV decodes in numba's pool of NUMBA_NUM_THREADS="
                        f"{numba.config.NUMBA_NUM_THREADS} threads (the CPUs this process may use); lower "
                        "loader.workers, or set NUMBA_NUM_THREADS")
    try:
        with torch_threads_kept():  # FFCV's Loader sets its thread count while it compiles
            return _FfcvLoader(str(path), batch_size=spec.per_rank_batch(), num_workers=workers,
                               os_cache=os_cache, order=order, seed=spec.seed,
                               drop_last=spec.train, pipelines=pipelines)
    except (AssertionError, ValueError, OSError, IndexError) as exc:
        raise UserError(f"{path}: not a readable .beton file ({type(exc).__name__}: {exc}); re-run "
                        "`fastimagenet convert --force`") from None


class _EpochOrder(TraversalOrder):
    """The samples of an epoch for this rank: the same on every rank and every run for a given (seed, epoch)."""

    def __init__(self, loader: _FfcvLoader, spec: LoaderSpec):
        super().__init__(loader)
        self.spec = spec
        self.quasi = None
        if spec.train and spec.options.ffcv.order == "quasi_random":
            try:
                self.quasi = QuasiRandom(loader)
            except ValueError as exc:
                raise UserError(f"{spec.path}: quasi-random order is not possible ({exc}); "
                                "use loader.ffcv.order=random") from None
            self.pages = self.quasi.page_to_samples_array.copy()

    def sample_order(self, epoch: int) -> np.ndarray:
        if self.quasi is not None:
            # FFCV shuffles its page table in place, so each order would depend on the ones drawn before it:
            # restore the table first to make the order a function of (seed, epoch) alone
            np.copyto(self.quasi.page_to_samples_array, self.pages)
            order = torch.from_numpy(self.quasi.sample_order(epoch).astype(np.int64))
        else:
            order = epoch_order(len(self.indices), self.spec.seed, epoch, shuffle=self.spec.train)
        return rank_share(order, self.spec).numpy().astype(np.uint64)


def _gpu_index(device: torch.device) -> int | None:
    """The GPU a device names, read in the calling thread (an unnumbered "cuda" is that thread's current GPU, as for
    `.to`); None for a CPU device, without touching CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


class _Closed(Exception):
    """Raised in the epoch thread once its iterator is closed: it decodes no further batch."""


class _DeviceEpochIterator(EpochIterator):
    """FFCV's epoch thread (it decodes and copies each batch to the GPU), made to use the loader's GPU first, and
    to hand a training batch's crop windows to the decoder just before decoding it.

    FFCV 1.0.2 runs each batch's copy under `torch.cuda.stream(s)` in this thread without setting a device, and a
    new thread's current device is GPU 0: entering the context switches to the stream's GPU, and leaving it switches
    back to GPU 0 (cudaSetDevice), which opens a CUDA context there (~0.5 GiB) in every torchrun process of rank > 0.
    With the loader's GPU current from the start, the thread never leaves it.
    """

    def __init__(self, loader: _FfcvLoader, order: np.ndarray, device: torch.device,
                 windows: Callable[[np.ndarray], np.ndarray] | None, window_node: int | None,
                 check: Callable[[np.ndarray], None] | None):
        self.gpu = _gpu_index(device)  # read here, in the caller's thread, where FFCV also makes its streams
        self.windows, self.window_node, self.check = windows, window_node, check
        self.error: BaseException | None = None
        self.copied: dict[int, torch.cuda.Event] = {}  # batch slot -> its last host->device copy, once enqueued
        super().__init__(loader, order)  # starts the thread
        if self.gpu is not None and self.cuda_streams[0] is not None:  # FFCV makes streams when CUDA is there
            warn_if_unpinned(self.memory_allocations["operation"])

    def run(self) -> None:
        # FFCV's thread dies silently on an error and leaves the consumer waiting for ever: end the epoch instead,
        # and re-raise the error in the consumer's thread (__next__)
        try:
            if self.gpu is not None:
                torch.cuda.set_device(self.gpu)
            super().run()
        except _Closed:
            pass
        except BaseException as exc:
            self.error = exc
            while not self.terminate_event.is_set():  # as FFCV hands over: until the consumer takes it or leaves
                try:
                    self.output_queue.put(None, timeout=0.5)
                    break
                except Full:
                    pass

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self.error is not None:
                raise self.error
            raise

    def close(self) -> None:
        """FFCV's close only asks its thread to stop (which it sees between batches once its queue is full, up to
        0.5 s later) and frees the epoch's memory under a thread that may still decode into it. Here the thread stops
        before its next batch and is gone before the memory goes. A thread left running when the program ends frees
        its last batch (a tensor) while the interpreter shuts down, and that aborts the process ("terminate called
        without an active exception")."""
        self.terminate_event.set()
        if self is not threading.current_thread():  # (the thread itself closes nothing it is still running)
            while self.is_alive():
                with suppress(Empty):
                    self.output_queue.get_nowait()  # room for the batch (or the epoch's end) it may be putting
                self.join(timeout=0.05)
        if not self.closed:
            super().close()
            self.closed = True

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        """One batch into its slot. FFCV's events keep a slot's *device* buffers until the training step has read
        them, but nothing keeps its pinned *host* buffers until the copy out of them has run: a CPU more than a
        slot cycle ahead of the GPU (a small model, a busy stream) would decode the next batch over a batch whose
        copy is still queued. So this thread (never the training thread) first waits for that copy."""
        if self.terminate_event.is_set():
            raise _Closed
        if batch_slot in self.copied:
            wait_until_done(self.copied[batch_slot])
        if self.check is not None:  # the batch's records are the bytes convert wrote, before they are decoded
            self.check(batch_indices)
        if self.windows is not None:
            WindowCropDecoder.fill(self.memory_allocations, self.window_node, batch_slot, self.windows(batch_indices))
        result = super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
        if self.gpu is not None and self.cuda_streams[batch_slot] is not None:  # the copies ran on this stream
            self.copied[batch_slot] = torch.cuda.Event()
            self.copied[batch_slot].record(self.cuda_streams[batch_slot])
        return result


@atexit.register
def _close_epoch_threads() -> None:
    """Epochs still being read when the program ends (a run stopped mid-epoch, `show-batch`'s one batch) are closed
    while the interpreter still runs normally (see _DeviceEpochIterator.close)."""
    for thread in threading.enumerate():
        if isinstance(thread, _DeviceEpochIterator):
            thread.close()


def wait_until_done(event) -> None:
    """A host wait for an event, by polling: it runs in FFCV's epoch thread, and a polled query is not a blocking
    CUDA call (which torch's sync debug mode, used by the GPU tests, would flag anywhere in the process)."""
    while not event.query():
        time.sleep(50e-6)


def unpinned_host_bytes(buffers: dict) -> int:
    """Bytes of host buffers (FFCV's per-operation allocations: tensors, numpy arrays, tuples or lists of them)
    that are not in pinned memory. FFCV tries to pin each and, when that fails (the locked-memory limit, no pinned
    memory left), silently keeps pageable memory, and then every copy to the GPU is a host sync."""
    total = 0
    for value in buffers.values():
        for buffer in value if isinstance(value, (tuple, list)) else [value]:
            tensor = torch.from_numpy(buffer) if isinstance(buffer, np.ndarray) else buffer
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and not tensor.is_pinned():
                total += tensor.numel() * tensor.element_size()
    return total


def warn_if_unpinned(buffers: dict) -> None:
    unpinned = unpinned_host_bytes(buffers)
    if unpinned:
        print(f"warning: FFCV could not pin {unpinned / 2**20:,.0f} MiB of its host buffers, so each batch's copy "
              "to the GPU blocks the training thread; raise the locked-memory limit (`ulimit -l unlimited`, docker "
              "`--ulimit memlock=-1`) or lower the batch size")


def _record_check(beton: Beton, stored: np.ndarray | None, verify: str) -> Callable[[np.ndarray], None] | None:
    """What checks a batch's records against their `stored` checksums (loader.ffcv.verify), or None."""
    if stored is None:
        print(f"notice: {beton.path}: no record checksums (a file written by FFCV itself, or by an older "
              "`fastimagenet convert`): its tables are checked, the bytes of its images are not")
        return None
    return None if verify == "off" else lambda batch: beton.check_records(batch, stored)


class FfcvLoader:
    def __init__(self, spec: LoaderSpec):
        path = beton_path(spec)
        meta = read_sidecar(path)
        if spec.classes is not None and spec.classes != meta["classes"]:
            raise UserError(f"{path}: its classes differ from the train split's; convert both from one dataset "
                            "root, or pass --classes-from TRAIN.beton to `fastimagenet convert`")
        beton = Beton(path)
        beton.check_tables(len(meta["classes"]))  # a damaged file stops here, before FFCV reads a record
        self._record_check = _record_check(beton, stored_sums(meta, len(beton.images)), spec.options.ffcv.verify)
        self._passes = 0
        # the epoch being read, while something reads it (its thread, the consumer): closed when the next starts
        self._reading: weakref.ref[_DeviceEpochIterator] | None = None
        self.spec, self.classes = spec, list(meta["classes"])
        self.skipped: dict[str, str] = {}  # files that did not decode were left out (and reported) by convert
        self._decoder = _decoder(spec)
        self._loader = _ffcv_loader(spec, path, _pipelines(spec, self._decoder), OrderOption.SEQUENTIAL,
                                    spec.options.ffcv.os_cache)
        if self._loader.reader.num_samples != meta["images"]:
            raise UserError(f"{path}: holds {self._loader.reader.num_samples} images but its sidecar says "
                            f"{meta['images']}; re-run `fastimagenet convert --force`")
        # FFCV's constructor takes only an order *instance* built from the loader, so the order is set after it
        self._loader.traversal_order = _EpochOrder(self._loader, spec)
        self._loader.first_traversal_order = self._loader.traversal_order.sample_order(0)
        self._first_step = 0
        self._check_fits(self._loader.batch_size)
        if spec.train:  # (width, height) by sample index, and the decoder's node in FFCV's graph (for its windows)
            self._sizes = np.stack([self._decoder.metadata["width"], self._decoder.metadata["height"]], axis=1)
            self._window_node = self._loader.graph.operation_to_node[self._decoder][0].id

    def _check_fits(self, per_rank_batch: int) -> None:
        if self.spec.train:
            check_batch_fits(per_rank_batch, len(self._loader.first_traversal_order), self.spec.path,
                             self.spec.batch_setting())

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        self._loader.next_epoch, self._first_step = epoch, first_step

    def reconfigure(self, resolution: int, batch_size: int) -> None:
        per_rank = self.spec.per_rank_batch(batch_size)
        self._check_fits(per_rank)
        self._decoder.output_size = (resolution, resolution)
        self._loader.batch_size = per_rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # FFCV's Loader.__iter__ (its code is generated once, when it is built), with our epoch thread
        loader = self._loader  # (the epoch thread sets its decode threads itself: see the module notes)
        # a resumed epoch skips the batches it already had; the others get the crops they have in a whole pass
        order = loader.next_traversal_order()[self._first_step * loader.batch_size : len(loader) * loader.batch_size]
        epoch, spec = loader.next_epoch, self.spec
        loader.next_epoch += 1
        check = self._record_check if self._passes == 0 or spec.options.ffcv.verify == "always" else None
        self._passes += 1
        unfinished = self._reading() if self._reading is not None else None
        if unfinished is not None:  # left mid-epoch (a stopped run, a bench pass): it decodes no more
            unfinished.close()
        windows = window_node = None
        if spec.train:
            sizes, window_node = self._sizes, self._window_node
            windows = lambda batch: crop_windows(batch, sizes, spec.seed, epoch, spec.augment)  # noqa: E731
        epoch_iterator = _DeviceEpochIterator(loader, order, spec.device, windows, window_node, check)
        self._reading = weakref.ref(epoch_iterator)
        return epoch_iterator


def raw_pipeline(spec: LoaderSpec) -> _FfcvLoader:
    """FFCV used by hand, as its own examples do: its random-resized-crop decoder (our scale and ratio) and flip for
    training, and its own random order. The baseline FfcvLoader must keep up with."""
    path = beton_path(spec)
    order = OrderOption.QUASI_RANDOM if spec.options.ffcv.order == "quasi_random" else OrderOption.RANDOM
    if spec.train:
        size = (spec.resolution, spec.resolution)
        decoder = RandomResizedCropRGBImageDecoder(size, scale=tuple(spec.augment.scale),
                                                   ratio=tuple(spec.augment.ratio))
        pipelines = _pipelines(spec, decoder, flip=spec.augment.flip)
    else:
        pipelines = _pipelines(spec, _decoder(spec))
    return _ffcv_loader(spec, path, pipelines, order if spec.train else OrderOption.SEQUENTIAL,
                        spec.options.ffcv.os_cache)
