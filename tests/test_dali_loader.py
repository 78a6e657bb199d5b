"""DALI backend in CPU mode (what CI runs), plus GPU-mode tests marked `gpu`."""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from nvidia.dali import backend as dali_backend, backend_impl as dali_backend_impl
from PIL import Image

from fastimagenet import loaders
from fastimagenet.bench import bench_loader
from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools import verify
from fastimagenet.dataset_tools.scan import scan_image_folder
from fastimagenet.loaders import dali_loader
from fastimagenet.loaders.dali_loader import (DALI_FORMATS, Handover, decoder_options, dali_failure, handover,
                                              output_stream, pipeline_error)
from fastimagenet.loaders.dali_options import DaliOptions
from fastimagenet.loaders.options import LoaderConfig
from fastimagenet.selfcheck import stream_stays_busy
from tests.conftest import make_spec, train


def dali_spec(path, device="cpu", **kwargs):
    spec = make_spec(path, name="dali", **kwargs)
    spec.options = LoaderConfig(name="dali", workers=1, dali=DaliOptions(device=device))
    return spec


def labels_of(loader) -> list[int]:
    return [int(v) for _, labels in loader for v in labels]


@pytest.mark.parametrize("train_split", [True, False])
def test_labels_order_and_crops_match_the_torchvision_backend(jpeg_dataset, train_split):
    """The same samples in the same order; in training also the same crops and flips (drawn per sample from
    (seed, epoch, index) by loaders/augment.py), so each image differs from torchvision's only by decoder and resize
    (mean absolute difference ~3 of 255 here, where another crop of the same photo differs by tens). Epoch 1 is the
    one DALI prepared when epoch 0 ended; epoch 3 is not, so its prepared epoch 2 is dropped."""
    path = jpeg_dataset / ("train" if train_split else "val")
    spec = dict(train=train_split, batch_size=8, seed=5)
    dali = loaders.build_loader("dali", dali_spec(path, **spec))
    reference = loaders.build_loader("torchvision", make_spec(path, workers=1, **spec))
    for epoch in (0, 1, 3):
        dali.set_epoch(epoch)
        reference.set_epoch(epoch)
        ours, theirs = list(dali), list(reference)
        assert [labels.tolist() for _, labels in ours] == [labels.tolist() for _, labels in theirs]
        if train_split:
            for (a, _), (b, _) in zip(ours, theirs):
                assert (a.float() - b.float()).abs().mean(dim=(1, 2, 3)).max() < 10
    assert dali.classes == reference.classes


def test_pixels_are_the_image_and_val_is_deterministic(tmp_path):
    """A solid-colour image comes out as that colour, whatever the crop; eval output repeats exactly."""
    for label, colour in enumerate([(250, 10, 10), (10, 250, 10)]):
        (tmp_path / f"c{label}").mkdir()
        Image.new("RGB", (90, 60), colour).save(tmp_path / f"c{label}" / "a.jpg", quality=95)
    for train_split in (True, False):
        loader = loaders.build_loader("dali", dali_spec(tmp_path, train=train_split, batch_size=2, resolution=24))
        (images, labels), = list(loader)
        assert images.shape == (2, 3, 24, 24)
        means = images.float().mean(dim=(2, 3))
        assert torch.allclose(means, torch.tensor([[250.0, 10, 10], [10, 250, 10]]), atol=6)
    again, _ = next(iter(loader))
    assert torch.equal(again, images)


def test_each_epoch_gets_its_stage_shape_and_one_pipeline_at_a_time_but_the_pools_stay(jpeg_dataset, monkeypatch):
    """An epoch read to its end starts the next epoch's pipeline at its shape: used when the next epoch keeps it,
    dropped when a new stage comes (or another epoch). At no time is more than one pipeline alive."""
    released = []  # DALI's pools must outlive the pipelines: the next one takes its memory from them
    for module in (dali_backend, dali_backend_impl):
        monkeypatch.setattr(module, "ReleaseUnusedMemory", lambda: released.append(True))
    built = []
    new_pipeline = dali_loader._new_pipeline
    monkeypatch.setattr(dali_loader, "_new_pipeline",
                        lambda *args: built.append(weakref.ref(pipe := new_pipeline(*args))) or pipe)
    alive = lambda: sum(ref() is not None for ref in built)  # noqa: E731
    loader = loaders.build_loader("dali", dali_spec(jpeg_dataset / "train", batch_size=8))
    for epoch, (resolution, batch) in enumerate([(32, 8), (32, 8), (24, 16), (40, 4), (32, 8), (48, 12)]):
        loader.reconfigure(resolution, batch)
        loader.set_epoch(epoch)
        shapes = set()
        for images, _ in loader:
            shapes.add(tuple(images.shape))
            gc.collect()
            assert alive() == 1
        assert shapes == {(batch, 3, resolution, resolution)}
        assert loader._pipe is None and loader._prepared[0].epoch == epoch + 1  # the next epoch's, started
    gc.collect()
    assert alive() == 1
    # epoch 0's, then one prepared at each epoch's end; epochs 2-5 changed shape, so theirs were built anew
    assert len(built) == 1 + 6 + 4
    assert released == []


def test_an_epoch_left_early_prepares_nothing(jpeg_dataset):
    loader = loaders.build_loader("dali", dali_spec(jpeg_dataset / "train", batch_size=8))
    for _ in zip(range(2), loader):
        pass
    assert loader._pipe is None and loader._prepared is None


def test_labels_are_copied_once_per_epoch_and_batches_take_views(jpeg_dataset):
    loader = loaders.build_loader("dali", dali_spec(jpeg_dataset / "train", batch_size=8))
    storages = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = [labels for _, labels in loader]
        assert len(batches) == 12 and all(labels._base is not None for labels in batches)  # views, not copies
        storages.append({labels.untyped_storage().data_ptr() for labels in batches})
    assert all(len(epoch) == 1 for epoch in storages)  # one label vector per epoch


@pytest.mark.parametrize("decode, device, gpu, pin", [
    ("mixed", "cuda:1", "cuda:1", False),  # decoded on the training GPU, handed over on its current stream
    ("mixed", "cpu", "cuda", False),  # loader.dali.device=gpu for a CPU run: the current GPU decodes
    ("cpu", "cuda:0", None, True),  # host output bound for a GPU: pinned, so its copy does not block
    ("cpu", "cpu", None, False),
])
def test_the_handover_picks_the_decoding_gpu_and_what_is_pinned(decode, device, gpu, pin):
    hand = handover(decode, torch.device(device))
    assert hand == Handover(gpu=None if gpu is None else torch.device(gpu), pin=pin)
    if gpu is None:
        assert output_stream(hand) is None  # host outputs: nothing to bind to a stream


def test_pipelines_use_the_executor_that_can_hand_over_on_a_stream(jpeg_dataset):
    loader = loaders.build_loader("dali", dali_spec(jpeg_dataset / "train", batch_size=8))
    batches = iter(loader)
    next(batches)
    assert loader._pipe.exec_dynamic  # DALI's run(stream) refuses any other executor


def test_decoders_ignore_exif_and_pad_nvjpeg_buffers_only_on_the_gpu():
    cpu, mixed = decoder_options("cpu", 0.65), decoder_options("mixed", 0.65)
    assert cpu["adjust_orientation"] is False and mixed["adjust_orientation"] is False
    assert "device_memory_padding" not in cpu and "hw_decoder_load" not in cpu
    assert mixed["device_memory_padding"] == 211_025_920 and mixed["host_memory_padding"] == 140_544_512
    assert mixed["hw_decoder_load"] == 0.65


def test_decode_threads_are_the_worker_budget(jpeg_dataset, monkeypatch):
    """A pipeline's threads: the process's share of the CPUs for train, half for val, the node's processes dividing
    the share; loader.workers, then loader.dali.threads, override it."""
    share = len(os.sched_getaffinity(0))

    def threads(workers: int, train: bool = True, dali_threads: int = 0) -> int:
        spec = dali_spec(jpeg_dataset / "train", train=train)
        spec.options.workers, spec.options.dali.threads = workers, dali_threads
        loader = loaders.build_loader("dali", spec)
        batches = iter(loader)
        next(batches)  # the pass's pipeline lives while its iterator does
        return loader._pipe.num_threads

    for local_world_size in (1, 2):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world_size))
        per_process = max(1, share // local_world_size)
        assert threads(0) == per_process and threads(0, train=False) == max(1, per_process // 2)
    assert threads(3) == 3 and threads(3, dali_threads=2) == 2


def test_gpu_decode_takes_a_few_threads_whatever_the_core_count(monkeypatch):
    """On a 224-thread 8-GPU node the CPU share is 28 threads per rank (14 for val), each with ~470 MiB of padded
    nvJPEG buffers when decoding on the GPU: there the default is a few threads; CPU decode keeps the share, and
    loader.dali.threads or loader.workers, when set, are taken as they are."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(224)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")

    def threads(train: bool, decode: str, workers: int = 0, dali_threads: int = 0) -> int:
        spec = make_spec("", train=train, workers=workers)
        spec.options.dali.threads = dali_threads
        return dali_loader.decode_threads(spec, decode)

    assert (threads(True, "mixed"), threads(False, "mixed")) == (6, 3)
    assert (threads(True, "cpu"), threads(False, "cpu")) == (28, 14)
    assert threads(True, "mixed", workers=12) == 12 and threads(False, "mixed", dali_threads=9) == 9


def test_an_epoch_left_early_does_not_leak_into_the_next(jpeg_dataset):
    loader = loaders.build_loader("dali", dali_spec(jpeg_dataset / "train", batch_size=8))
    loader.set_epoch(4)
    full = labels_of(loader)
    for _ in zip(range(2), loader):  # the consumer stops after 2 of 12 batches
        pass
    assert labels_of(loader) == full


def test_files_dali_cannot_decode_are_left_out_and_reported(folder_with_bad_files, capsys):
    loader = loaders.build_loader("dali", dali_spec(folder_with_bad_files, batch_size=32))
    assert sorted(p.rsplit("/", 1)[1] for p in loader.skipped) == ["a_gif.jpg", "not_really.jpg", "notes.txt",
                                                                   "truncated.jpg"]  # as every backend
    assert "GIF images are not supported" in loader.skipped[str(folder_with_bad_files / "class_02" / "a_gif.jpg")]
    assert "warning: 4 files" in capsys.readouterr().out
    assert sum(labels.shape[0] for _, labels in loader) == 96  # the epoch completes on the 96 good images


def test_strict_mode_makes_a_bad_file_an_error(folder_with_bad_files):
    with pytest.raises(UserError, match=r"(truncated|not_really|a_gif)\.jpg: unreadable image"):
        loaders.build_loader("dali", dali_spec(folder_with_bad_files, strict=True))


def test_verification_is_cached_and_redone_for_changed_files(folder_with_bad_files, monkeypatch):
    checked = []
    real = verify.inspect_image
    monkeypatch.setattr(verify, "inspect_image", lambda path, formats: checked.append(path) or real(path, formats))
    loaders.build_loader("dali", dali_spec(folder_with_bad_files))
    assert len(checked) == 99
    checked.clear()
    loaders.build_loader("dali", dali_spec(folder_with_bad_files))
    assert checked == []
    fixed = folder_with_bad_files / "class_00" / "truncated.jpg"
    shutil.copy(next((folder_with_bad_files / "class_00").glob("img_*.jpg")), fixed)
    loader = loaders.build_loader("dali", dali_spec(folder_with_bad_files))
    assert checked == [str(fixed)] and str(fixed) not in loader.skipped


def test_verification_records_each_kept_image_size_from_its_header(folder_with_bad_files, monkeypatch):
    """The sizes DALI places its crop windows with: as the headers state them, also when read from the cache."""
    scan = scan_image_folder(folder_with_bad_files)
    kept = verify.kept_samples(scan, "train")
    headers = []
    for path, _ in kept.samples:
        with Image.open(path) as img:
            headers.append(img.size)
    assert kept.sizes == headers and len(set(headers)) > 10  # photo-like sizes vary
    monkeypatch.setattr(verify, "inspect_image", None)  # nothing is inspected again
    assert verify.kept_samples(scan, "train").sizes == headers


def test_a_damaged_verification_cache_is_ignored(folder_with_bad_files):
    loaders.build_loader("dali", dali_spec(folder_with_bad_files))
    for cache in verify.cache_dir().glob("*.json"):
        cache.write_text('{"version": 1, "files": {')
    loader = loaders.build_loader("dali", dali_spec(folder_with_bad_files))
    assert len(loader.skipped) == 4  # 3 images and notes.txt


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"class_03/img_\w+\.jpg: DALI could not decode this image \(changed since it was verified\?\)$"),
    ("garbage", r"DALI could not decode an image at or just after \[.*\] \(changed since it was verified\?\): "
                r"nvImageCodec failure"),  # DALI does not name the file when it cannot even tell the format
])
def test_an_image_changed_after_verification_is_a_clear_error(folder_with_bad_files, damage, message):
    loader = loaders.build_loader("dali", dali_spec(folder_with_bad_files, batch_size=8))
    victim = next((folder_with_bad_files / "class_03").glob("img_*.jpg"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"x" * len(data))
    with pytest.raises(UserError, match=message):
        list(loader)


def _dali_error(operator: str, what: str) -> str:
    """A pipeline error as DALI 2.4 words it (the frame as seen from a failing decoder, the inner line varied)."""
    return (f"Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.{operator}`,\nwhich was used in the "
            f"pipeline definition with the following traceback:\n\n  File \"x.py\", line 1\n\nencountered:\n\n{what}\n"
            "Current pipeline object is no longer valid.")


@pytest.mark.parametrize("message, kind", [
    (_dali_error("decoders.image_random_crop", "Failed to decode sample #3 : /data/a.jpg"), "decode"),
    (_dali_error("decoders.image", "nvImageCodec failure: '#4'"), "decode"),  # codestream unsupported
    # an allocation failing inside a decoder is not a bad file:
    (_dali_error("decoders.image_random_crop", "Can't allocate 211025920 bytes on device 0."), "out of memory"),
    (_dali_error("decoders.image", "nvImageCodec failure: '#5'"), "out of memory"),  # allocator failure
    (_dali_error("resize", "CUDA allocation failed"), "out of memory"),
    ("Critical error when building pipeline:\nCUDA runtime API error cudaErrorMemoryAllocation (2):\nout of memory",
     "out of memory"),
    (_dali_error("readers.file", "File mapping failed: /data/a.jpg"), None),  # neither: raised as DALI raised it
])
def test_pipeline_failures_are_told_apart(message, kind):
    assert dali_failure(message) == kind
    error = pipeline_error(RuntimeError(message), ["/data/a.jpg"])
    if kind is None:
        assert isinstance(error, RuntimeError) and str(error) == message
    else:
        assert isinstance(error, UserError)
        assert ("ran out of memory" in str(error)) == (kind == "out of memory")
        assert ("could not decode" in str(error)) == (kind == "decode")


def test_out_of_memory_names_what_to_lower():
    error = pipeline_error(MemoryError("std::bad_alloc"), ["/data/a.jpg"])
    assert isinstance(error, UserError) and "loader.dali.threads" in str(error) and "batch size" in str(error)


def _both_arrived(store) -> None:
    """Both ranks are here before the group forms: forming it is bounded by the group's timeout too, and a process
    started under load can take longer than that to get this far (seen: 1 s was not enough beside a CPU hog)."""
    store.add("arrived", 1)
    deadline = time.monotonic() + 600  # a hang guard
    while store.add("arrived", 0) < 2:
        assert time.monotonic() < deadline, "the other rank never arrived"
        time.sleep(0.01)


def _verify_as_rank(rank: int, port: int, root: str, cache: str, out: str, slower_than_the_group: bool) -> None:
    os.environ["FASTIMAGENET_CACHE"] = cache
    checked = []
    real = verify.inspect_image
    verify.inspect_image = lambda path, formats: checked.append(path) or real(path, formats)
    timeout = timedelta(minutes=30)
    if slower_than_the_group:  # local rank 0's verification outlasts the process group's timeout
        timeout, verify_ = timedelta(seconds=5), verify._verify
        if rank == 0:
            verify._verify = lambda *args: time.sleep(6) or verify_(*args)
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False)  # the test's own, see below
    _both_arrived(store)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
    try:
        good, bad, _ = verify.verified_samples(scan_image_folder(root), DALI_FORMATS, local_rank=rank)
    finally:
        torch.distributed.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"checked": len(checked), "good": good, "bad": bad}))


@pytest.mark.parametrize("slower_than_the_group", [False, True])
def test_one_process_per_node_verifies_the_others_read_its_cache(folder_with_bad_files, tmp_path,
                                                                  slower_than_the_group):
    """The others wait in the store, not in a collective: a verification that outlasts the process group's timeout
    (a first run over a large dataset on a slow filesystem) does not time them out."""
    # The ranks meet at a store on a port the OS gives it as it binds (0): none is picked first and bound later,
    # when another process may have taken it
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(_verify_as_rank, args=(store.port, str(folder_with_bad_files), str(tmp_path / "cache"), str(tmp_path),
                                    slower_than_the_group), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [rank["checked"] for rank in ranks] == [99, 0]  # local rank 1 waited for local rank 0's cache
    assert ranks[0]["good"] == ranks[1]["good"] and ranks[0]["bad"] == ranks[1]["bad"]
    assert len(ranks[1]["bad"]) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_gpu_decode_without_cuda_is_a_clear_error(jpeg_dataset):
    with pytest.raises(UserError, match="loader.dali.device=gpu needs a CUDA device"):
        loaders.build_loader("dali", dali_spec(jpeg_dataset / "train", device="gpu"))


def test_raw_baseline_yields_the_same_shapes(jpeg_dataset):
    batches = list(loaders.build_raw_pipeline("dali", dali_spec(jpeg_dataset / "train", batch_size=8)))
    assert len(batches) == 12
    images, labels = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64


def test_bench_times_passes_as_epochs_so_each_prepared_epoch_is_used(jpeg_dataset, monkeypatch):
    """`bench loader` runs the loader as `train` does, a new epoch each pass: every pass but the first (3 rounds
    after 1 untimed) takes the pipeline its previous one prepared, as the raw reader reads on into its next epoch."""
    built = []
    new_pipeline = dali_loader._new_pipeline
    monkeypatch.setattr(dali_loader, "_new_pipeline", lambda *args: built.append(args) or new_pipeline(*args))
    result = bench_loader("dali", str(jpeg_dataset / "train"), 32, 16, 1, "cpu", [], rounds=3,
                          options=LoaderConfig(name="dali", workers=1, dali=DaliOptions(device="cpu")))
    assert result["images_per_s"] > 0
    assert len(built) == 1 + 4  # the first pass's own, then one prepared at the end of each of the 4 passes


# Reads a pass to its end (so the next pass's pipeline is built and running), leaves the loader in a reference cycle,
# then forks a child whose garbage collector frees it, as a DataLoader worker or a writer process forked later does.
_COLLECTED_IN_A_CHILD = """
import gc, multiprocessing, sys
from fastimagenet import loaders
from tests.test_dali_loader import dali_spec
loader = loaders.build_loader("dali", dali_spec(sys.argv[1], train=True))
for _ in loader:
    pass
cycle = [loader]
cycle.append(cycle)
del loader, cycle
gc.disable()
child = multiprocessing.get_context("fork").Process(target=gc.collect)
child.start()
child.join()
print("child exit code", child.exitcode)
"""


def test_a_forked_child_that_frees_an_inherited_pipeline_exits(jpeg_dataset, tmp_path):
    """Without the at-fork guard the child crashed (exit code -11) or hung in the pipeline's destructor."""
    from tests.processes import run_to_end

    done = run_to_end([sys.executable, "-c", _COLLECTED_IN_A_CHILD, str(jpeg_dataset / "train")],
                      tmp_path / "fork.log", timeout=300)  # a hang is one of the failures this test is for
    assert done.returncode == 0, done.stdout[-3000:]
    assert "child exit code 0" in done.stdout, done.stdout[-3000:]


def test_tiny_training_run_with_dali_learns(jpeg_dataset, tmp_path):
    metrics = train("dali", jpeg_dataset, tmp_path / "run", "epochs=5", "schedule.stages=0,24,16;2,32,8",
                    "loader.dali.device=cpu")
    assert [m["resolution"] for m in metrics] == [24, 24, 32, 32, 32]
    assert metrics[-1]["val_top1"] >= 0.6  # 4 classes: chance is 0.25
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]


# ------------------------------------------------------------------------------------------------ GPU (mixed)
def cuda_spec(path, **kwargs):
    spec = dali_spec(path, device="gpu", **kwargs)
    spec.device = torch.device("cuda")
    return spec


@pytest.mark.gpu
def test_gpu_decode_delivers_channels_last_uint8_on_the_device(jpeg_dataset):
    path = jpeg_dataset / "train"
    loader = loaders.build_loader("dali", cuda_spec(path, batch_size=8, seed=1))
    images, labels = next(iter(loader))
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.uint8
    assert images.shape == (8, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
    cpu = loaders.build_loader("dali", dali_spec(path, batch_size=8, seed=1))
    assert labels_of(loader) == labels_of(cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_steady_state_batches_never_make_the_host_wait(jpeg_dataset, decode):
    """20 batches after warm-up under torch's sync debug mode "error", while a long kernel keeps the current stream
    busy: every batch must come (and be used) with that kernel still running. A host wait inside DALI, which torch's
    debug mode cannot see, would have let the kernel finish."""
    spec = cuda_spec(jpeg_dataset / "train", batch_size=2)  # 48 batches an epoch
    spec.options.dali.device = decode
    batches = iter(loaders.build_loader("dali", spec))
    assert stream_stays_busy(batches)
    batches.close()


@pytest.mark.gpu
@pytest.mark.parametrize("train_split", [True, False])
def test_gpu_decoded_pixels_are_the_cpu_decoded_ones_within_decoder_noise(jpeg_dataset, train_split):
    """nvJPEG and libjpeg-turbo differ only in their IDCT and chroma upsampling: the same crops of the same files
    come out within a few levels of 255 (another crop of the same photo differs by tens)."""
    path = jpeg_dataset / ("train" if train_split else "val")
    gpu = loaders.build_loader("dali", cuda_spec(path, train=train_split, batch_size=8, seed=3))
    cpu = loaders.build_loader("dali", dali_spec(path, train=train_split, batch_size=8, seed=3))
    for (on_gpu, gpu_labels), (on_cpu, cpu_labels) in zip(gpu, cpu):
        assert torch.equal(gpu_labels.cpu(), cpu_labels)
        difference = (on_gpu.cpu().float() - on_cpu.float()).abs()
        assert difference.mean() < 3 and difference.quantile(0.99) < 32


@pytest.mark.gpu
def test_gpu_memory_is_bounded_over_40_epochs_of_cycling_stages(jpeg_dataset, capsys):
    """Device memory (DALI's pools, which DALI 2.4 offers no call to read, plus torch's and the context) and torch's
    reserved memory after each epoch + evaluation: the first round of the 4 stages may grow them, the 9 after it may
    not. Prints the time to each epoch's first batch (pipeline build included)."""
    train_loader = loaders.build_loader("dali", cuda_spec(jpeg_dataset / "train", batch_size=8))
    val_loader = loaders.build_loader("dali", cuda_spec(jpeg_dataset / "val", train=False, batch_size=8))
    stages = [(32, 8), (64, 16), (48, 12), (96, 24)]
    used, reserved = [], []
    for epoch in range(40):
        resolution, batch = stages[epoch % len(stages)]
        train_loader.reconfigure(resolution, batch)
        train_loader.set_epoch(epoch)
        start = time.perf_counter()
        batches = iter(train_loader)
        images, _ = next(batches)
        torch.cuda.synchronize()
        first_batch_s = time.perf_counter() - start
        shapes = {tuple(images.shape)} | {tuple(images.shape) for images, _ in batches}
        assert shapes == {(batch, 3, resolution, resolution)}
        assert sum(labels.shape[0] for _, labels in val_loader) == 32
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used.append(total - free)
        reserved.append(torch.cuda.memory_reserved())
        with capsys.disabled():
            print(f"\nepoch {epoch:2d} {resolution:3d} px x{batch:2d}: first batch {first_batch_s * 1e3:6.1f} ms, "
                  f"device used {used[-1] / 2**20:7.0f} MiB, torch reserved {reserved[-1] / 2**20:5.0f} MiB", end="")
    assert max(used[len(stages):]) <= max(used[: len(stages)]) + 64 * 2**20
    assert max(reserved[len(stages):]) <= max(reserved[: len(stages)])


@pytest.mark.gpu
def test_tiny_training_run_with_gpu_decode_learns(jpeg_dataset, tmp_path):
    metrics = train("dali", jpeg_dataset, tmp_path / "run", "epochs=5", "schedule.stages=0,24,16;2,32,8",
                    "loader.dali.device=gpu", "runtime.device=cuda")
    assert metrics[-1]["val_top1"] >= 0.6
