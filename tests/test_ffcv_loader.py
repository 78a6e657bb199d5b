"""The ffcv backend beyond the shared contract: per-epoch reconfiguration, orders, pixels, errors, a run that learns,
decode threads, the epoch thread's GPU."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numba
import numpy as np
import pytest
import torch
from PIL import Image

from fastimagenet import loaders
from fastimagenet import bench
from fastimagenet.bench import bench_loader
from fastimagenet.cli import main
from fastimagenet.common.errors import UserError
from fastimagenet.config import DataConfig, load_config
from fastimagenet.dataset_tools.beton_check import record_problems
from fastimagenet.dataset_tools.beton_file import Beton
from fastimagenet.dataset_tools.convert import ConvertOptions, convert, convert_folder, load_rgb
from fastimagenet.dataset_tools.inspect_beton import inspect_beton
from fastimagenet.dataset_tools.synthetic_jpegs import make_jpeg_folder
from fastimagenet.loaders.augment import crop_windows
from fastimagenet.loaders.ffcv_options import FfcvOptions
from fastimagenet.loaders.options import LoaderConfig
# FFCV's first import in a process picks numba's threading layer: it goes through the loader
# (common.threads.importing_ffcv)
from fastimagenet.loaders.ffcv_loader import EpochIterator, _gpu_index, unpinned_host_bytes
from ffcv.types import HeaderType  # noqa: E402 - after the loader, which imports FFCV first
from tests.conftest import TINY_RUN, PacedClock, make_spec, train


@pytest.fixture(scope="module")
def betons(jpeg_dataset, tmp_path_factory):
    """jpeg_dataset as out/{train,val}.beton (and the sidecars)."""
    out = tmp_path_factory.mktemp("betons")
    convert(jpeg_dataset, out, ConvertOptions(workers=2))
    return out


@pytest.fixture(scope="module")
def one_per_class_beton(one_per_class, tmp_path_factory):
    """one_per_class stored raw: a label names its sample, and the pixels are the files' own."""
    return convert_folder(one_per_class, tmp_path_factory.mktemp("raw") / "o.beton", write_mode="raw", workers=1)


def ffcv_spec(path, **kwargs):
    return make_spec(path, name="ffcv", **kwargs)


def test_reconfigure_reshapes_every_batch_of_the_next_epoch(betons):
    loader = loaders.build_loader("ffcv", ffcv_spec(betons / "train.beton", resolution=24, batch_size=8))
    assert {tuple(images.shape) for images, _ in loader} == {(8, 3, 24, 24)} and len(loader) == 12
    loader.reconfigure(40, 32)
    loader.set_epoch(1)
    shapes = [(tuple(images.shape), tuple(labels.shape)) for images, labels in loader]
    assert shapes == [((32, 3, 40, 40), (32,))] * 3 and len(loader) == 3
    with pytest.raises(UserError, match="larger than the 96 samples"):
        loader.reconfigure(40, 128)


def test_quasi_random_order_is_deterministic_and_covers_every_sample(one_per_class_beton):
    """The samples each rank reads in an epoch, as set_epoch picks them."""
    options = LoaderConfig(name="ffcv", workers=1, ffcv=FfcvOptions(order="quasi_random", os_cache=False))

    def epoch_of(loader, epoch):
        loader.set_epoch(epoch)
        return [label for _, labels in loader for label in labels.tolist()]

    orders = []
    for rank in range(2):
        spec = dataclasses.replace(ffcv_spec(one_per_class_beton, rank=rank, world_size=2, batch_size=4),
                                   options=options)
        loader = loaders.build_loader("ffcv", spec)
        orders.append(epoch_of(loader, 3))
        assert epoch_of(loader, 4) != orders[-1]  # another epoch, another order
        assert epoch_of(loader, 3) == orders[-1]  # and epoch 3 again is the same one
    assert len(orders[0]) == len(orders[1]) == 8 and sorted(orders[0] + orders[1]) == list(range(16))


def test_val_pixels_match_the_source_images(one_per_class, one_per_class_beton):
    """Centre crop with crop_ratio 1 is the image's centred square, resized to the resolution as FFCV resizes
    (OpenCV's area interpolation): the decoded batch is every file's square. Stored raw, so nothing else differs."""
    spec = dataclasses.replace(ffcv_spec(one_per_class_beton, train=False, resolution=36, batch_size=16),
                               augment=DataConfig(crop_ratio=1.0))
    images, labels = next(iter(loaders.build_loader("ffcv", spec)))
    assert labels.tolist() == list(range(16))
    for image, path in zip(images, sorted(one_per_class.glob("*/*"))):
        source = load_rgb(str(path), 512)
        side = min(source.shape[:2])
        top, left = (source.shape[0] - side) // 2, (source.shape[1] - side) // 2
        square = cv2.resize(source[top : top + side, left : left + side], (36, 36), interpolation=cv2.INTER_AREA)
        difference = np.abs(image.permute(1, 2, 0).numpy().astype(int) - square)
        assert difference.max() <= 1, path  # rounding in another build of OpenCV, at most


def test_train_crops_are_the_windows_every_backend_draws(one_per_class, one_per_class_beton):
    """Each training sample is its (seed, epoch, index) window of the stored pixels, resized as FFCV resizes and
    flipped by its flag: the crops the other backends give it, and the same again for a resumed epoch."""
    augment = DataConfig(scale=[0.25, 1.0], ratio=[0.75, 1.33], flip=True)
    spec = dataclasses.replace(ffcv_spec(one_per_class_beton, resolution=36, batch_size=16, seed=5), augment=augment)
    loader = loaders.build_loader("ffcv", spec)
    loader.set_epoch(2)
    images, labels = next(iter(loader))
    sources = [load_rgb(str(path), 512) for path in sorted(one_per_class.glob("*/*"))]
    sizes = np.array([(source.shape[1], source.shape[0]) for source in sources])
    flips = 0
    for image, index in zip(images, labels.tolist()):  # one image per class: the label is the index
        [(left, top, right, bottom, flip)] = crop_windows([index], sizes, 5, 2, augment)
        expected = cv2.resize(sources[index][top:bottom, left:right], (36, 36), interpolation=cv2.INTER_AREA)
        expected = expected[:, ::-1] if flip else expected
        flips += flip
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - expected).max() <= 1, index
    assert 0 < flips < 16


def test_an_error_in_the_epoch_thread_reaches_the_training_loop(betons, monkeypatch):
    """FFCV's own epoch thread would die and leave the loop waiting for a batch for ever."""
    def fail(*args):
        raise RuntimeError("no windows today")

    monkeypatch.setattr(loaders.ffcv_loader, "crop_windows", fail)
    loader = loaders.build_loader("ffcv", ffcv_spec(betons / "train.beton", resolution=24, batch_size=8))
    with pytest.raises(RuntimeError, match="no windows today"):
        next(iter(loader))


def _epoch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if isinstance(thread, EpochIterator)]


def test_an_epoch_left_unfinished_stops_its_thread_when_closed_or_when_the_next_starts(betons, monkeypatch):
    """A run stopped mid-epoch, a bench pass or `show-batch` leave an epoch unread: its decode thread must not run on
    (into memory the next epoch reuses, or into the interpreter's shutdown)."""
    decoded = []
    decode = loaders.ffcv_loader._DeviceEpochIterator.run_pipeline
    monkeypatch.setattr(loaders.ffcv_loader._DeviceEpochIterator, "run_pipeline",
                        lambda self, *args: decoded.append(self) or decode(self, *args))
    loader = loaders.build_loader("ffcv", ffcv_spec(betons / "train.beton", resolution=24, batch_size=8))
    first = iter(loader)
    next(first)
    second = iter(loader)
    assert not first.is_alive() and second in _epoch_threads()
    assert decoded.count(first) < len(loader)  # it stopped where it was, not at the epoch's end
    next(second)
    second.close()
    assert not second.is_alive()
    assert len(list(loader)) == len(loader)  # the loader reads whole epochs after both


# Leaves an epoch after 2 batches and exits. The atexit handler registered first runs last (after the loader's own):
# by then no epoch thread may be running, or one would free its batch while the interpreter shuts down and abort it.
_LEAVES_AN_EPOCH = """
import atexit, sys, threading
atexit.register(lambda: print("epoch threads at exit", sum(type(t).__name__ == "_DeviceEpochIterator"
                                                            for t in threading.enumerate())))
from fastimagenet import loaders
from tests.conftest import make_spec
batches = iter(loaders.build_loader("ffcv", make_spec(sys.argv[1], resolution=24, batch_size=8, name="ffcv")))
next(batches), next(batches)
print("left the epoch")
"""


def test_a_process_that_leaves_an_epoch_exits_cleanly(betons, tmp_path):
    from tests.processes import run_to_end

    done = run_to_end([sys.executable, "-c", _LEAVES_AN_EPOCH, str(betons / "train.beton")], tmp_path / "left.log")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "left the epoch" in done.stdout and "epoch threads at exit 0" in done.stdout, done.stdout[-3000:]


def test_a_folder_or_a_file_without_sidecar_is_a_clear_error(jpeg_dataset, betons, tmp_path):
    with pytest.raises(UserError, match="reads a .beton file, not a folder.*fastimagenet convert"):
        loaders.build_loader("ffcv", ffcv_spec(jpeg_dataset / "train"))
    orphan = tmp_path / "orphan.beton"
    orphan.write_bytes((betons / "train.beton").read_bytes())
    with pytest.raises(UserError, match="orphan.beton.json: missing"):
        loaders.build_loader("ffcv", ffcv_spec(orphan))


def test_val_classes_must_match_the_train_split(betons):
    with pytest.raises(UserError, match="classes differ from the train split"):
        loaders.build_loader("ffcv", ffcv_spec(betons / "val.beton", train=False, classes=["x", "y"]))


def test_bench_times_the_loader_against_raw_ffcv(betons, monkeypatch):
    """On a clock where a batch of the loader takes 0.25 s and one of raw FFCV 0.5 s, 16 images a batch: 64 and 32
    images/s, twice as fast."""
    clock = PacedClock()
    monkeypatch.setattr(bench, "time", clock)
    build, raw = loaders.build_loader, loaders.build_raw_pipeline
    monkeypatch.setattr(loaders, "build_loader", lambda name, spec: clock.pace(build(name, spec), 0.25))
    monkeypatch.setattr(loaders, "build_raw_pipeline", lambda name, spec: clock.pace(raw(name, spec), 0.5))
    result = bench_loader("ffcv", str(betons / "train.beton"), 32, 16, 1, "cpu", ["raw"])
    assert (result["images_per_s"], result["raw_images_per_s"], result["ratio_vs_raw"]) == (64, 32, 2)
    assert clock.now == 4 * 6 * (0.25 + 0.5)  # 96 images: 6 batches a pass; an untimed pass, then 3 timed ones


def test_tiny_ffcv_run_learns_with_two_resolutions_and_batch_sizes(betons, tmp_path):
    out = tmp_path / "run"
    # the shared tiny-model settings of the training tests; the later data.* overrides point them at the files
    metrics = train("ffcv", betons, out, "epochs=5", "schedule.stages=0,24,16;2,32,8",
                    f"data.train={betons / 'train.beton'}", f"data.val={betons / 'val.beton'}")
    assert [m["resolution"] for m in metrics] == [24, 24, 32, 32, 32]
    assert [m["batch_size"] for m in metrics] == [16, 16, 8, 8, 8]
    assert metrics[-1]["val_top1"] >= 0.6  # 4 classes: chance is 0.25


@pytest.mark.parametrize("setting, shown, nearest_allowed", [
    ("data.crop_ratio=0.0624", "data.crop_ratio=0.0624", "data.crop_ratio=0.0625"),
    ("data.ratio=32,40", "data.ratio=32.0,40.0", "data.ratio=31.9,40"),
    ("data.ratio=0.01,0.03125", "data.ratio=0.01,0.03125", "data.ratio=0.01,0.0313"),
])
def test_a_crop_empty_on_the_smallest_stored_image_is_a_config_error(setting, shown, nearest_allowed, capsys):
    """FFCV would crop 0 pixels of an image with a 16-pixel side (the smallest convert stores) and abort the process
    inside OpenCV's resize; the command stops first with a config error naming the setting."""
    assert main(["train", "--loader", "ffcv", "data.train=train.beton", "data.val=val.beton", setting]) == 2
    err = capsys.readouterr().err
    assert f"error: config: '{shown}' makes FFCV's" in err and "aborts the process" in err
    load_config(None, ["loader.name=ffcv", nearest_allowed])


def test_os_cache_is_the_default_and_off_only_with_quasi_random_order():
    assert load_config(None, []).loader.ffcv.os_cache
    with pytest.raises(UserError, match="'loader.ffcv.os_cache=false' needs 'loader.ffcv.order=quasi_random'"):
        load_config(None, ["loader.ffcv.os_cache=false"])
    cfg = load_config(None, ["loader.ffcv.os_cache=false", "loader.ffcv.order=quasi_random"])
    assert not cfg.loader.ffcv.os_cache


def _record_batches(monkeypatch, calls: list) -> None:
    """Notes, in order, each batch FFCV's epoch thread builds (run_pipeline holds its CUDA stream work) and from
    which thread, then builds it as usual."""
    run_pipeline = EpochIterator.run_pipeline

    def recorded(self, *args):
        calls.append(("batch", threading.current_thread()))
        return run_pipeline(self, *args)

    monkeypatch.setattr(EpochIterator, "run_pipeline", recorded)


def _record_set_device(monkeypatch, calls: list) -> None:
    monkeypatch.setattr(torch.cuda, "set_device", lambda gpu: calls.append(("set_device", gpu,
                                                                            threading.current_thread())))


def test_epoch_thread_makes_the_loaders_gpu_current_before_its_first_batch(betons, monkeypatch):
    loader = loaders.build_loader("ffcv", ffcv_spec(betons / "train.beton", batch_size=32))
    # the pipelines were built for the CPU (no CUDA here); only the epoch thread's device step sees cuda:1
    loader.spec = dataclasses.replace(loader.spec, device=torch.device("cuda", 1))
    calls = []
    _record_batches(monkeypatch, calls)
    _record_set_device(monkeypatch, calls)
    assert len(list(loader)) == 3
    thread = calls[0][-1]
    assert calls == [("set_device", 1, thread)] + [("batch", thread)] * 3
    assert thread is not threading.main_thread()  # the current device is per thread: set in FFCV's own


def test_a_cpu_loader_sets_no_gpu_and_an_unnumbered_cuda_is_the_callers_gpu(betons, monkeypatch):
    calls = []
    _record_set_device(monkeypatch, calls)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: calls.append("current_device") or 3)
    assert len(list(loaders.build_loader("ffcv", ffcv_spec(betons / "train.beton", batch_size=32)))) == 3
    assert _gpu_index(torch.device("cpu")) is None and calls == []
    assert _gpu_index(torch.device("cuda", 1)) == 1 and calls == []
    assert _gpu_index(torch.device("cuda")) == 3


def test_decode_threads_are_the_worker_budget_and_torch_keeps_its_own(betons, monkeypatch):
    """FFCV's decode parallelism is numba's thread count in its epoch thread: the train share, half for val. FFCV
    sets torch's thread count along with numba's; the training thread's stays what it was (the suite's 2), so a
    one-worker val loader does not leave evaluation on one thread."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    share = len(os.sched_getaffinity(0))
    torch_threads = torch.get_num_threads()
    for split, train, workers, expected in (("train", True, 0, share), ("val", False, 0, max(1, share // 2)),
                                            ("train", True, 1, 1)):
        loader = loaders.build_loader("ffcv", ffcv_spec(betons / f"{split}.beton", train=train, workers=workers))
        threads = []
        run_pipeline = EpochIterator.run_pipeline
        monkeypatch.setattr(EpochIterator, "run_pipeline",
                            lambda self, *args: threads.append(numba.get_num_threads()) or run_pipeline(self, *args))
        list(loader)
        monkeypatch.undo()
        assert loader._loader.num_workers == expected and set(threads) == {expected}
        assert torch.get_num_threads() == torch_threads


def test_more_workers_than_numba_threads_is_a_clear_error(betons):
    workers = numba.config.NUMBA_NUM_THREADS + 1
    with pytest.raises(UserError, match=f"loader.workers={workers}: .*NUMBA_NUM_THREADS"):
        loaders.build_loader("ffcv", ffcv_spec(betons / "train.beton", workers=workers))


# Runs under torchrun, after the training command: which GPUs this process opened a CUDA context on. Asked of the
# driver (cuDevicePrimaryCtxGetState) because nvidia-smi shows no process IDs inside most containers.
_CONTEXTS_DRIVER = """
import json, os, sys
import torch
from fastimagenet.cli import main
status = main(sys.argv[2:])
gpus = [i for i in range(torch.cuda.device_count()) if torch._C._cuda_hasPrimaryContext(i)]
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as out:
    json.dump({"status": status, "gpus": gpus}, out)
"""


def test_host_buffers_left_unpinned_are_counted_for_the_warning():
    """FFCV falls back to pageable memory without a word when pinning fails; the loader counts what is unpinned
    (here, on a CPU, nothing is pinned) and warns on a GPU, where each such copy would block the host."""
    buffers = {1: (torch.zeros(4, dtype=torch.uint8), np.zeros(8, np.uint8)), 2: None, 3: [torch.zeros(2)]}
    assert unpinned_host_bytes(buffers) == 4 + 8 + 2 * 4


@pytest.mark.gpu
def test_batches_taken_while_the_gpu_lags_hold_their_own_images(betons):
    """With the compute stream held back by a long kernel, the epoch thread runs a slot cycle and more ahead of
    the copies: each batch must still hold its own pixels (the pinned host slot is reused only once its copy has
    run), and FFCV's host buffers are pinned."""
    spec = ffcv_spec(betons / "val.beton", train=False, batch_size=2)
    on_cpu = [images.clone() for images, _ in loaders.build_loader("ffcv", spec)]
    spec.device = torch.device("cuda")
    batches = iter(loaders.build_loader("ffcv", spec))
    assert unpinned_host_bytes(batches.memory_allocations["operation"]) == 0
    torch.cuda._sleep(2_000_000_000)  # clock cycles: the copies queue behind it
    on_gpu = [images.clone() for images, _ in batches]  # the clones queue too
    torch.cuda.synchronize()
    assert len(on_gpu) == len(on_cpu) == 16
    assert all(torch.equal(a.cpu(), b) for a, b in zip(on_gpu, on_cpu))


@pytest.mark.gpu
def test_torchrun_ranks_open_a_context_on_their_own_gpu_only(betons, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    driver = tmp_path / "driver.py"
    driver.write_text(_CONTEXTS_DRIVER)
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", str(driver),
               str(tmp_path), "train", "--loader", "ffcv", f"data.train={betons / 'train.beton'}",
               f"data.val={betons / 'val.beton'}", f"runtime.out_dir={tmp_path / 'run'}", *TINY_RUN,
               "runtime.device=cuda", "epochs=2", "schedule.stages=0,32,16"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks == [{"status": 0, "gpus": [0]}, {"status": 0, "gpus": [1]}]


@pytest.mark.parametrize("first", ["import fastimagenet.loaders.ffcv_loader",
                                   "from fastimagenet.dataset_tools.convert import ConvertOptions, write_records; "
                                   "write_records(Path(sys.argv[1]), [(np.zeros((8, 8, 3), np.uint8), 0)] * 4, "
                                   "ConvertOptions(write_mode='raw', workers=1))"])
def test_the_first_ffcv_import_leaves_torchs_threads_alone(first, tmp_path):
    """FFCV's compiler module sets the importing thread's torch count to 1; the loader and the .beton writer (the
    demo writes its files just before it trains, in the same process) import it with the count kept."""
    code = f"import sys; from pathlib import Path; import numpy as np; import torch; torch.set_num_threads(2); {first}; " \
           "print(torch.get_num_threads())"
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.beton")], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, timeout=600)  # a hang guard (see the one-CPU test)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "2"


# Writes a .beton and reads it back through the ffcv loader in a process confined to one CPU (as `taskset -c 0`, a
# one-CPU container or a Slurm task with one core), then says which numba threading layer ran FFCV's decode.
_ON_ONE_CPU = """
import os, sys
from pathlib import Path
import numpy as np
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import numba
from fastimagenet import loaders
from fastimagenet.dataset_tools.convert import ConvertOptions, write_records, write_sidecar
from tests.conftest import make_spec
write_records(Path(sys.argv[1]), [(np.full((8, 8, 3), i, np.uint8), i % 2) for i in range(8)],
              ConvertOptions(write_mode="raw", workers=1))
write_sidecar(Path(sys.argv[1]), ["even", "odd"], 8)
batches = list(loaders.build_loader("ffcv", make_spec(sys.argv[1], train=False, resolution=8, name="ffcv")))
print("layer", numba.threading_layer(), "batches", len(batches))
"""


def test_a_process_on_one_cpu_writes_reads_and_exits(tmp_path):
    """numba's TBB pool never let such a process exit (it waited in unload_tbb at shutdown); the FFCV imports put
    OpenMP first there (common.threads.importing_ffcv)."""
    from tests.processes import run_to_end

    done = run_to_end([sys.executable, "-c", _ON_ONE_CPU, str(tmp_path / "one.beton")], tmp_path / "one-cpu.log",
                      timeout=300)  # a hang is the failure this test is for: the guard is its whole time
    assert done.returncode == 0, done.stdout[-3000:]
    assert "layer omp batches 2" in done.stdout


def _overwritten_in_runs(beton: Path, out: Path, in_tables: int) -> Path:
    """A copy of `beton` with 64 random bytes at 40 places, `in_tables` of them inside the record table (as a bad disk,
    a torn copy or a half-synced bucket leaves a file)."""
    rng = np.random.default_rng(0)
    data = bytearray(beton.read_bytes())
    reader = Beton(beton).reader
    table_start = HeaderType.itemsize + reader.field_descriptors.nbytes  # the record table follows them
    places = list(rng.integers(table_start, table_start + reader.metadata.nbytes - 64, in_tables))
    places += list(rng.integers(0, len(data) - 64, 40 - in_tables))
    for place in places:
        data[place : place + 64] = rng.bytes(64)
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda beton, out: _overwritten_in_runs(beton, out, in_tables=8),
     r"damaged \.beton file: record \d+: .*bad records in all\)\. Write it again"),
    (lambda beton, out: out.write_bytes(beton.read_bytes()[: beton.stat().st_size // 2]) and out,
     r"not a readable \.beton file"),
    (lambda beton, out: out.write_bytes(np.random.default_rng(1).bytes(beton.stat().st_size)) and out,
     r"not a readable \.beton file"),
])
def test_a_damaged_beton_is_refused_before_a_record_is_read(betons, tmp_path, damage, message):
    """FFCV would read whatever lies where a changed pointer points: such a file trained without a word."""
    damaged = damage(betons / "train.beton", tmp_path / "train.beton")
    shutil.copy(betons / "train.beton.json", tmp_path / "train.beton.json")
    with pytest.raises(UserError, match=message):
        loaders.build_loader("ffcv", ffcv_spec(damaged, resolution=24, batch_size=8))


def test_inspect_names_the_bad_records_of_damaged_tables_without_decoding(betons, tmp_path, capsys):
    damaged = _overwritten_in_runs(betons / "train.beton", tmp_path / "train.beton", in_tables=8)
    shutil.copy(betons / "train.beton.json", tmp_path / "train.beton.json")
    assert main(["inspect", str(damaged)]) == 2
    out = capsys.readouterr()
    assert "damaged_records:" in out.out and "record " in out.out and "damaged tables" in out.err


def test_the_table_check_holds_at_imagenets_size_and_finds_one_bad_pointer_among_them():
    """1.28 M records (the check runs at every open: ~0.3 s on cpu-2c, see BENCHMARKS.md), the allocations in
    another order than the records, as FFCV's writer processes leave them."""
    count = 1_281_167
    alloc = np.zeros(count, dtype=[("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
    alloc["sample_id"], alloc["size"] = np.arange(count), 110_000
    alloc["ptr"] = 4096 + alloc["sample_id"] * 110_000
    images = np.zeros(count, dtype=[("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
    images["width"], images["height"], images["data_ptr"] = 500, 375, alloc["ptr"]
    labels, end = np.arange(count) % 1000, 4096 + count * 110_000
    assert record_problems(images, labels, alloc[::-1], 4096, end, 1000) == (0, {})
    images["data_ptr"][777_777] += 8  # inside its own allocation, but not where it starts
    assert record_problems(images, labels, alloc[::-1], 4096, end, 1000) == (
        1, {777_777: "data pointer is not an allocation of this record"})


def _with_record_changed(beton: Path, out: Path, record: int) -> Path:
    """A copy of `beton` (and its sidecar) with 8 bytes inside `record`'s image data inverted: the tables still
    sound, only the checksums can tell."""
    data = bytearray(beton.read_bytes())
    ptr = int(Beton(beton).images[record]["data_ptr"])
    data[ptr + 40 : ptr + 48] = bytes(b ^ 0xFF for b in data[ptr + 40 : ptr + 48])
    out.write_bytes(bytes(data))
    shutil.copy(f"{beton}.json", f"{out}.json")
    return out


def _epochs(loader, count: int) -> None:
    for epoch in range(count):
        loader.set_epoch(epoch)
        for _ in loader:
            pass


def test_changed_image_bytes_stop_the_first_epoch_and_verify_off_trains_on_them(betons, tmp_path):
    changed = _with_record_changed(betons / "train.beton", tmp_path / "train.beton", record=37)
    spec = ffcv_spec(changed, resolution=24, batch_size=8)
    with pytest.raises(UserError, match=r"train\.beton: record 37: its bytes are not those convert wrote"):
        _epochs(loaders.build_loader("ffcv", spec), 1)
    spec.options = LoaderConfig(name="ffcv", ffcv=FfcvOptions(verify="off"))
    _epochs(loaders.build_loader("ffcv", spec), 1)


@pytest.mark.parametrize("verify, checked_passes", [("first-epoch", 1), ("always", 3), ("off", 0)])
def test_records_are_checked_in_the_passes_verify_names(betons, monkeypatch, verify, checked_passes):
    checked = []
    check_records = Beton.check_records
    monkeypatch.setattr(Beton, "check_records",
                        lambda self, batch, stored: checked.append(len(batch)) or check_records(self, batch, stored))
    spec = ffcv_spec(betons / "train.beton", resolution=24, batch_size=8)
    spec.options = LoaderConfig(name="ffcv", ffcv=FfcvOptions(verify=verify))
    _epochs(loaders.build_loader("ffcv", spec), 3)
    assert checked == [8] * 12 * checked_passes  # every batch of each checked pass, none of the others


def test_inspect_verify_names_a_record_whose_bytes_changed(betons, tmp_path, capsys):
    assert inspect_beton(betons / "train.beton", verify=True)["checksums"] == "stored"
    changed = _with_record_changed(betons / "train.beton", tmp_path / "train.beton", record=5)
    assert main(["inspect", str(changed), "--verify"]) == 2
    assert "'record 5': 'its bytes are not those convert wrote (checksum mismatch)'" in capsys.readouterr().out


def test_a_file_without_checksums_loads_with_a_notice(betons, tmp_path, capsys):
    """As FFCV's own writer (or an older convert) leaves it: the tables are still checked."""
    plain = tmp_path / "train.beton"
    shutil.copy(betons / "train.beton", plain)
    meta = json.loads((betons / "train.beton.json").read_text())
    del meta["record_sums"]
    (tmp_path / "train.beton.json").write_text(json.dumps(meta))
    _epochs(loaders.build_loader("ffcv", ffcv_spec(plain, resolution=24, batch_size=8)), 1)
    assert "no record checksums" in capsys.readouterr().out
    assert inspect_beton(plain)["checksums"].startswith("none")


# Quality guard of the DCT-scaled region decode (loaders/ffcv_window_decoder.py), as for the torchvision backend's
# (tests/test_image_decode.py): PSNR against the window of the whole record decoded exactly and resized with Lanczos,
# for the region path and for the whole decode FFCV itself does (its fast integer IDCT, then the same area resize),
# 24 synthetic photos of ~400 px, epoch 0's crops. Measured, mean / lowest dB at 128, 176, 224 px: region 40.56 /
# 28.75, 45.12 / 41.37, 44.52 / 41.14; whole 42.60 / 39.12, 42.43 / 39.85, 42.01 / 39.82. Where no DCT reduction
# applies (most crops at 176 and 224 px) the region path is closer than FFCV's own decode (its exact IDCT); at 128 px
# the 1/2-scale IDCT gives up ~2 dB on average for 1.5x the images per second (BENCHMARKS.md), the level of the
# torchvision backend's scaled path (40.97 dB mean at 128 px on its own guard). The floors sit under these figures.
REGION_FLOOR_DB = {128: (40.2, 28.0), 176: (44.7, 40.8), 224: (44.1, 40.6)}  # mean, lowest


@pytest.fixture(scope="module")
def photos_beton(tmp_path_factory):
    """24 classes of one ~400 px photo each: a label names its record."""
    root = tmp_path_factory.mktemp("photos")
    make_jpeg_folder(root / "train", classes=24, per_class=1, size=400, seed=5)
    return convert_folder(root / "train", root / "train.beton")


def _psnr_against_lanczos(beton_path: Path, resolution: int) -> list[float]:
    beton = Beton(beton_path)
    sizes = np.stack([beton.images["width"], beton.images["height"]], axis=1)
    figures = []
    spec = make_spec(beton_path, name="ffcv", train=True, batch_size=8, resolution=resolution, seed=7)
    for images, labels in loaders.build_loader("ffcv", spec):
        for image, label in zip(images, labels.tolist()):
            left, top, right, bottom, flip = crop_windows([label], sizes, 7, 0, DataConfig())[0].tolist()
            reference = Image.fromarray(beton.pixels(label)).resize((resolution, resolution), Image.LANCZOS,
                                                                    box=(left, top, right, bottom))
            reference = np.asarray(reference).astype(float)[:, ::-1 if flip else 1]
            error = np.mean((image.permute(1, 2, 0).numpy().astype(float) - reference) ** 2)
            figures.append(10 * np.log10(255**2 / max(error, 1e-9)))
    return figures


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [128, 176, 224])
def test_scaled_region_decode_stays_close_to_a_high_quality_reference(photos_beton, resolution, monkeypatch):
    region = _psnr_against_lanczos(photos_beton, resolution)
    from fastimagenet.loaders import ffcv_window_decoder  # FFCV is imported by now, through the loader's guard

    monkeypatch.setattr(ffcv_window_decoder, "decode_region", lambda *args: -1)  # every JPEG decoded whole
    whole = _psnr_against_lanczos(photos_beton, resolution)
    mean_floor, lowest_floor = REGION_FLOOR_DB[resolution]
    assert np.mean(region) >= mean_floor and min(region) >= lowest_floor, (np.mean(region), min(region))
    assert region != whole  # the two paths decoded differently: the region decoder ran
