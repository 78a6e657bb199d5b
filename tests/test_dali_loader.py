"""DALI backend in CPU mode (what CI runs), plus GPU-mode tests marked `gpu`."""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import weakref
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import loaders
from dataset_tools import verify
from dataset_tools.scan import scan_image_folder
from fastimagenet.config import DaliOptions, LoaderConfig
from fastimagenet.errors import UserError
from tests.conftest import make_spec, train

pytest.importorskip("nvidia.dali")

from loaders.dali_loader import DALI_FORMATS  # noqa: E402


@pytest.fixture(autouse=True)
def private_verify_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTIMAGENET_CACHE", str(tmp_path_factory.mktemp("cache")))


def dali_spec(path, device="cpu", **kwargs):
    spec = make_spec(path, name="dali", **kwargs)
    spec.options = LoaderConfig(name="dali", workers=1, dali=DaliOptions(device=device))
    return spec


def labels_of(loader) -> list[int]:
    return [int(v) for _, labels in loader for v in labels]


@pytest.mark.parametrize("train_split", [True, False])
def test_labels_and_order_match_the_torchvision_backend(jpeg_dataset, train_split):
    path = jpeg_dataset / ("train" if train_split else "val")
    spec = dict(train=train_split, batch_size=8, seed=5)
    dali = loaders.build_loader("dali", dali_spec(path, **spec))
    reference = loaders.build_loader("torchvision", make_spec(path, workers=0, **spec))
    for epoch in (0, 3):
        dali.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert labels_of(dali) == labels_of(reference)
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


def test_each_epoch_gets_its_stage_shape_and_its_pipeline_is_released(jpeg_dataset):
    loader = loaders.build_loader("dali", dali_spec(jpeg_dataset / "train", batch_size=8))
    pipelines = []
    for epoch, (resolution, batch) in enumerate([(32, 8), (32, 8), (24, 16), (40, 4), (32, 8), (48, 12)]):
        loader.reconfigure(resolution, batch)
        loader.set_epoch(epoch)
        shapes = set()
        for images, _ in loader:
            shapes.add(tuple(images.shape))
            if len(shapes) == 1 and loader._pipe is not None and not pipelines[epoch:]:
                pipelines.append(weakref.ref(loader._pipe))
        assert shapes == {(batch, 3, resolution, resolution)}
        assert loader._pipe is None  # released with its epoch
    gc.collect()
    assert len(pipelines) == 6 and all(ref() is None for ref in pipelines)


def test_an_epoch_left_early_does_not_leak_into_the_next(jpeg_dataset):
    loader = loaders.build_loader("dali", dali_spec(jpeg_dataset / "train", batch_size=8))
    loader.set_epoch(4)
    full = labels_of(loader)
    for _ in zip(range(2), loader):  # the consumer stops after 2 of 12 batches
        pass
    assert labels_of(loader) == full


def test_files_dali_cannot_decode_are_left_out_and_reported(folder_with_bad_files, capsys):
    loader = loaders.build_loader("dali", dali_spec(folder_with_bad_files, batch_size=32))
    assert sorted(p.rsplit("/", 1)[1] for p in loader.skipped) == ["a_gif.jpg", "not_really.jpg", "truncated.jpg"]
    assert "GIF images are not supported" in loader.skipped[str(folder_with_bad_files / "class_02" / "a_gif.jpg")]
    assert "3 unreadable images left out" in capsys.readouterr().out
    assert sum(labels.shape[0] for _, labels in loader) == 96  # the epoch completes on the 96 good images


def test_strict_mode_makes_a_bad_file_an_error(folder_with_bad_files):
    with pytest.raises(UserError, match=r"(truncated|not_really|a_gif)\.jpg: unreadable image"):
        loaders.build_loader("dali", dali_spec(folder_with_bad_files, strict=True))


def test_verification_is_cached_and_redone_for_changed_files(folder_with_bad_files, monkeypatch):
    checked = []
    real = verify.image_problem
    monkeypatch.setattr(verify, "image_problem", lambda path, formats: checked.append(path) or real(path, formats))
    loaders.build_loader("dali", dali_spec(folder_with_bad_files))
    assert len(checked) == 99
    checked.clear()
    loaders.build_loader("dali", dali_spec(folder_with_bad_files))
    assert checked == []
    fixed = folder_with_bad_files / "class_00" / "truncated.jpg"
    shutil.copy(next((folder_with_bad_files / "class_00").glob("img_*.jpg")), fixed)
    loader = loaders.build_loader("dali", dali_spec(folder_with_bad_files))
    assert checked == [str(fixed)] and str(fixed) not in loader.skipped


def test_a_damaged_verification_cache_is_ignored(folder_with_bad_files):
    loaders.build_loader("dali", dali_spec(folder_with_bad_files))
    for cache in verify.cache_dir().glob("*.json"):
        cache.write_text('{"version": 1, "files": {')
    loader = loaders.build_loader("dali", dali_spec(folder_with_bad_files))
    assert len(loader.skipped) == 3


def test_an_image_changed_after_verification_is_a_clear_error(folder_with_bad_files):
    loader = loaders.build_loader("dali", dali_spec(folder_with_bad_files, batch_size=8))
    victim = next((folder_with_bad_files / "class_03").glob("img_*.jpg"))
    stat = victim.stat()
    victim.write_bytes(b"x" * stat.st_size)  # same size and time: the cache cannot notice
    with pytest.raises(UserError, match="DALI could not decode an image at or just after"):
        list(loader)


def _verify_as_rank(rank: int, port: int, root: str, cache: str, out: str) -> None:
    os.environ["FASTIMAGENET_CACHE"] = cache
    checked = []
    real = verify.image_problem
    verify.image_problem = lambda path, formats: checked.append(path) or real(path, formats)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        good, bad = verify.verified_samples(scan_image_folder(root), DALI_FORMATS, local_rank=rank)
    finally:
        torch.distributed.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"checked": len(checked), "good": good, "bad": bad}))


def test_one_process_per_node_verifies_the_others_read_its_cache(folder_with_bad_files, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_verify_as_rank, args=(port, str(folder_with_bad_files), str(tmp_path / "cache"), str(tmp_path)),
             nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [rank["checked"] for rank in ranks] == [99, 0]  # local rank 1 waited for local rank 0's cache
    assert ranks[0]["good"] == ranks[1]["good"] and ranks[0]["bad"] == ranks[1]["bad"]
    assert len(ranks[1]["bad"]) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_gpu_decode_without_cuda_is_a_clear_error(jpeg_dataset):
    with pytest.raises(UserError, match="loader.dali.device=gpu needs a CUDA device"):
        loaders.build_loader("dali", dali_spec(jpeg_dataset / "train", device="gpu"))


@pytest.mark.parametrize("option, value", [("prefetch", 0), ("threads", -1), ("hw_decoder_load", 1.5)])
def test_bad_dali_options_name_the_key(jpeg_dataset, option, value):
    spec = dali_spec(jpeg_dataset / "train")
    setattr(spec.options.dali, option, value)
    with pytest.raises(UserError, match=f"loader.dali.{option}"):
        loaders.build_loader("dali", spec)


def test_raw_baseline_yields_the_same_shapes(jpeg_dataset):
    batches = list(loaders.build_raw_pipeline("dali", dali_spec(jpeg_dataset / "train", batch_size=8)))
    assert len(batches) == 12
    images, labels = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64


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
def test_gpu_memory_does_not_grow_across_stages(jpeg_dataset):
    loader = loaders.build_loader("dali", cuda_spec(jpeg_dataset / "train", batch_size=8))
    stages = [(32, 8), (64, 16), (48, 12)] * 4
    used = []
    for epoch, (resolution, batch) in enumerate(stages):
        loader.reconfigure(resolution, batch)
        loader.set_epoch(epoch)
        assert {tuple(images.shape) for images, _ in loader} == {(batch, 3, resolution, resolution)}
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used.append(total - free)
    assert max(used[6:]) <= max(used[:6]) + 64 * 2**20  # later rounds of the same stages: no growth


@pytest.mark.gpu
def test_tiny_training_run_with_gpu_decode_learns(jpeg_dataset, tmp_path):
    metrics = train("dali", jpeg_dataset, tmp_path / "run", "epochs=5", "schedule.stages=0,24,16;2,32,8",
                    "loader.dali.device=gpu", "runtime.device=cuda")
    assert metrics[-1]["val_top1"] >= 0.6
