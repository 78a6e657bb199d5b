"""Sharded datasets, locally and in S3: convert, read back, train, resume, cache, faults — against a real local S3
server (tests/s3_server.py), through the real boto3 client."""

from __future__ import annotations

import json
import signal
import sys
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastimagenet import loaders
from fastimagenet.cli import main
from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools import object_store
from fastimagenet.dataset_tools.object_cache import ObjectCache
from fastimagenet.dataset_tools.shards import Shard, read_index
from fastimagenet.loaders.shard_source import shard_order
from tests.conftest import data_path, make_spec, train
from tests.processes import Started
from tests.s3_server import BUCKET, _moto_port, fault_proxy, s3  # noqa: F401 - fixtures

URL = f"s3://{BUCKET}/tiny"


def convert_shards(src, dst, *extra) -> None:
    assert main(["convert", str(src), str(dst), "--format", "shards", "--shard-size-mb", "0.04", "--workers", "2",
                 *extra]) == 0


def labels_of(loader) -> list[int]:
    return [int(v) for _, labels in loader for v in labels]


@pytest.fixture
def s3_shards(s3, jpeg_dataset):
    """jpeg_dataset converted into the bucket: s3://datasets/tiny/{train,val}."""
    convert_shards(jpeg_dataset, URL)
    return URL


@pytest.mark.parametrize("where", ["local", "s3"])
def test_convert_round_trip_reads_back_every_image_and_label(where, s3, jpeg_dataset, tmp_path):
    dst = str(tmp_path / "shards") if where == "local" else URL
    convert_shards(jpeg_dataset / "train", dst)
    index = read_index(dst)
    assert index.classes == [f"class_{i:02d}" for i in range(4)] and len(index) == 96 and len(index.shards) > 2
    meta = json.loads(object_store.read_bytes(object_store.join(dst, "index.json")))
    sources = {}  # the source images, by their bytes (stored as they are: within the size limit)
    for label, name in enumerate(index.classes):
        for path in sorted((jpeg_dataset / "train" / name).glob("*.jpg")):
            sources[path.read_bytes()] = label
    seen = 0
    for number, shard in enumerate(index.shards):
        local = ObjectCache(tmp_path / "cache", 1).local(index.shard_url(number), shard.sha256, shard.sha256,
                                                         shard.bytes)
        idx_lines = object_store.read_bytes(object_store.join(dst, shard.idx_name)).decode().splitlines()
        assert idx_lines[0] == f"v1.2 {shard.samples}"  # DALI's wds2idx layout
        with tarfile.open(local) as tar:
            members = tar.getmembers()
            assert [m.name for m in members[:2]] == [f"{shard.first:09d}.jpg", f"{shard.first:09d}.cls"]
            for k, (jpg, cls) in enumerate(zip(members[::2], members[1::2])):
                data, label = tar.extractfile(jpg).read(), int(tar.extractfile(cls).read())
                assert sources[data] == label == index.labels[shard.first + k]
                assert idx_lines[1 + k].split() == ["jpg", str(jpg.offset_data), str(jpg.size), jpg.name,
                                                    "cls", str(cls.offset_data), str(cls.size), cls.name]
                assert index.offsets[shard.first + k] == jpg.offset_data
                with Image.open(tar.extractfile(jpg)) as img:
                    assert list(img.size) == index.sizes[shard.first + k].tolist()
                seen += 1
    assert seen == 96 and len(set(sources.values())) == 4
    assert meta["settings"]["order"] == "shuffled" and sorted(index.labels.tolist()) == sorted(sources.values())


@pytest.mark.parametrize("name", ["torchvision", "dali"])
def test_train_from_a_bucket_learns(name, s3_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(object_store, "_retries", 7)  # an earlier run's retries in this process: not this run's
    out = tmp_path / "run"
    args = ["train", "--loader", name, f"data.train={s3_shards}/train", f"data.val={s3_shards}/val",
            f"runtime.out_dir={out}", f"loader.cache_dir={tmp_path / 'cache'}", "epochs=5",
            "schedule.stages=0,24,16;2,32,8"]
    from tests.conftest import LEARNING_RUN

    assert main([*args, *LEARNING_RUN]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_top1"] >= 0.6  # 4 classes: chance is 0.25, as from the folder (tests/test_train.py)
    assert metrics[-1]["fetch_retries"] == 0
    assert len(list((tmp_path / "cache").glob("*.tar"))) == len(read_index(f"{s3_shards}/train").shards) + len(
        read_index(f"{s3_shards}/val").shards)


def test_ffcv_reads_a_beton_from_a_bucket_once(s3, jpeg_dataset, tmp_path):
    beton = data_path("ffcv", jpeg_dataset / "train", tmp_path)
    for suffix in ("", ".json"):
        object_store.put_file(type(beton)(f"{beton}{suffix}"), f"{URL}/train.beton{suffix}")
    cache = tmp_path / "cache"
    local = loaders.build_loader("ffcv", make_spec(beton, name="ffcv", seed=2))
    local.set_epoch(1)
    spec = make_spec(f"{URL}/train.beton", name="ffcv", seed=2)
    spec.options.cache_dir = str(cache)
    remote = loaders.build_loader("ffcv", spec)
    remote.set_epoch(1)
    assert labels_of(remote) == labels_of(local)
    [copy] = cache.glob("*-train.beton")
    stamp = copy.stat().st_mtime_ns
    loaders.build_loader("ffcv", spec)  # the second time from the cache: the same file, not fetched again
    assert copy.stat().st_ino == cache.joinpath(copy.name).stat().st_ino and copy.stat().st_mtime_ns >= stamp


def test_bench_streams_a_bucket_through_a_small_cache_in_a_process_of_its_own(s3_shards, tmp_path, capsys,
                                                                            monkeypatch):
    """`bench loader` on an s3:// split: the pipeline runs in a spawned process whose DataLoader workers receive the
    shard source (its cache included) pickled; a cache smaller than the shards a shuffle buffer spans makes every
    pass fetch them again."""
    monkeypatch.setenv("FASTIMAGENET_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "loader", "--loader", "torchvision", "--data", f"{s3_shards}/train", "--resolutions", "32",
                 "--batch-size", "16", "--workers", "1", "--rounds", "1", "loader.cache_gb=0.0001",
                 "loader.shuffle_buffer=8"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert row["images_per_s"] > 0
    shards = len(read_index(f"{s3_shards}/train").shards)
    assert len(list((tmp_path / "cache").rglob("*.tar"))) < shards  # streamed: the cache kept to its limit


def test_cache_keeps_to_its_limit_evicting_least_recently_used(s3_shards, tmp_path):
    index = read_index(f"{s3_shards}/train")
    biggest = max(shard.bytes for shard in index.shards)
    cache = ObjectCache(tmp_path / "cache", 2.5 * biggest / 1e9)  # room for two shards
    paths = []
    for number, shard in enumerate(index.shards[:4]):
        paths.append(cache.local(index.shard_url(number), shard.sha256, shard.sha256, shard.bytes))
        if number == 1:
            cache.local(index.shard_url(0), index.shards[0].sha256)  # used again: now the most recent
    kept = {path.name for path in (tmp_path / "cache").iterdir()}
    assert kept == {paths[3].name, paths[2].name}
    assert sum(path.stat().st_size for path in (tmp_path / "cache").iterdir()) <= 2.5 * biggest
    # an epoch through a cache smaller than the data still reads every sample
    spec = make_spec(f"{s3_shards}/train", batch_size=8)
    spec.options.cache_dir, spec.options.cache_gb = str(tmp_path / "small"), 2.5 * biggest / 1e9
    loader = loaders.build_loader("torchvision", spec)
    assert sorted(labels_of(loader)) == sorted(index.labels.tolist())


def test_an_epoch_reads_its_shards_a_group_at_a_time():
    """The order of (seed, epoch): every sample once; each shard's samples lie within one group of consecutive shards
    of at least loader.shuffle_buffer samples, so the shards an epoch needs at once (and keeps in the cache) are a
    group's, whatever the data's size."""
    shards = [Shard(f"shard-{n:06d}.tar", 10 * n, 10, 0, "") for n in range(20)]
    index = SimpleNamespace(shards=shards, shard_of=np.repeat(np.arange(20), 10))
    order = shard_order(index, seed=0, epoch=3, window=25)  # groups of 3 shards, 30 samples (the last: 2)
    assert sorted(order.tolist()) == list(range(200))
    assert np.array_equal(order, shard_order(index, seed=0, epoch=3, window=25))
    assert not np.array_equal(order, shard_order(index, seed=0, epoch=4, window=25))
    for start in range(0, 200, 30):
        assert len(set(index.shard_of[order[start : start + 30]].tolist())) <= 3


def test_a_cache_over_its_limit_says_so_once(s3_shards, tmp_path, capsys):
    """Shards the coming batches need stay even past the limit: the cache warns, naming the settings to change."""
    index = read_index(f"{s3_shards}/train")
    cache = ObjectCache(tmp_path / "cache", 1.5 * max(shard.bytes for shard in index.shards) / 1e9)
    for number, shard in enumerate(index.shards[:3]):
        cache.pinned[cache.local(index.shard_url(number), shard.sha256, shard.sha256, shard.bytes)] += 1
    err = capsys.readouterr().err
    assert err.count("over its") == 1 and "raise loader.cache_gb or lower loader.shuffle_buffer" in err


def test_a_resumed_epoch_from_a_bucket_is_the_rest_of_the_same_epoch(s3_shards, tmp_path):
    spec = make_spec(f"{s3_shards}/train", seed=4, batch_size=8)
    spec.options.cache_dir = str(tmp_path / "cache")
    loader = loaders.build_loader("torchvision", spec)
    loader.set_epoch(2)
    whole = [(images.clone(), labels.clone()) for images, labels in loader]
    loader.set_epoch(2, first_step=7)
    rest = [(images.clone(), labels.clone()) for images, labels in loader]
    assert len(rest) == len(whole) - 7
    assert all(torch.equal(a, b) and torch.equal(x, y) for (a, x), (b, y) in zip(rest, whole[7:]))


def test_transient_faults_are_retried_and_counted(s3_shards, fault_proxy, tmp_path, monkeypatch):
    monkeypatch.setattr(object_store, "_BACKOFF_S", 0.01)
    spec = make_spec(f"{s3_shards}/train", seed=1, batch_size=8)
    spec.options.cache_dir = str(tmp_path / "clean")
    loader = loaders.build_loader("torchvision", spec)
    loader.set_epoch(1)
    expected = labels_of(loader)
    assert fault_proxy.injected == 0
    before = object_store.retry_count()
    fault_proxy.plan = ["drop", "503", "503", 0.3, "drop"]
    spec.options.cache_dir = str(tmp_path / "faulty")  # every shard fetched again, through the faults
    loader = loaders.build_loader("torchvision", spec)
    loader.set_epoch(1)
    assert labels_of(loader) == expected
    assert fault_proxy.injected == 5
    assert object_store.retry_count() - before >= 4  # each drop and 503 is one retry; the stall is only slow


def test_a_stalled_read_is_retried(s3_shards, fault_proxy, tmp_path, monkeypatch):
    monkeypatch.setattr(object_store, "READ_TIMEOUT_S", 0.5)
    monkeypatch.setattr(object_store, "_BACKOFF_S", 0.01)
    index = read_index(f"{s3_shards}/train")
    fault_proxy.plan = [2.0]
    before = object_store.retry_count()
    ObjectCache(tmp_path / "cache", 1).local(index.shard_url(0), "k", index.shards[0].sha256, index.shards[0].bytes)
    assert object_store.retry_count() > before


def test_a_corrupted_or_missing_shard_is_a_clear_error(s3_shards, s3, tmp_path):
    index = read_index(f"{s3_shards}/train")
    key = f"tiny/train/{index.shards[1].name}"
    data = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-2000] ^= 0xFF  # one byte of an image changed: same size, another sha256
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    spec = make_spec(f"{s3_shards}/train", batch_size=8, workers=0)
    spec.options.cache_dir = str(tmp_path / "cache")
    with pytest.raises(UserError, match=f"s3://{BUCKET}/{key}: checksum mismatch"):
        labels_of(loaders.build_loader("torchvision", spec))
    assert not list((tmp_path / "cache").glob(f"*{index.shards[1].name}*"))  # nothing half-verified kept
    s3.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(UserError, match=f"s3://{BUCKET}/{key}: no such object"):
        labels_of(loaders.build_loader("dali", spec))
    with pytest.raises(UserError, match=f"s3://{BUCKET}/nothing/index.json: missing"):
        loaders.build_loader("torchvision", make_spec(f"s3://{BUCKET}/nothing"))
    with pytest.raises(UserError, match="s3://no-such-bucket/x/index.json: the bucket does not exist"):
        loaders.build_loader("torchvision", make_spec("s3://no-such-bucket/x"))


def test_a_killed_convert_leaves_no_index(tmp_path):
    from fastimagenet.dataset_tools.synthetic_jpegs import make_jpeg_folder

    make_jpeg_folder(tmp_path / "src", classes=2, per_class=300, size=64, seed=5)
    dst = tmp_path / "shards"
    command = [sys.executable, "-m", "fastimagenet", "convert", str(tmp_path / "src"), str(dst), "--format",
               "shards", "--shard-size-mb", "0.001", "--workers", "1"]
    with Started(command, tmp_path / "convert.log") as process:
        process.wait_for("the fourth shard", lambda: (dst / "shard-000003.tar").exists())
        process.popen.send_signal(signal.SIGKILL)
        process.popen.wait()
    assert not (dst / "index.json").exists()
    with pytest.raises(UserError, match="index.json: missing"):
        read_index(str(dst))
    assert not np.any([path.name.endswith(".tar") and path.stat().st_size == 0 for path in dst.iterdir()])


def test_a_stop_while_shards_download_resumes_and_ends_as_an_unstopped_run(s3_shards, fault_proxy, tmp_path,
                                                                          monkeypatch, capsys):
    """SIGTERM inside an epoch whose shards are still being fetched (each fetch stalled, and a cache of about two
    shards, so every epoch fetches again): the run stops after its step with a checkpoint, and the resume ends with
    the weights of a run never stopped."""
    from tests.step_signals import signalling_build
    from tests.test_preemption import RUN, _assert_ends_as

    def args(out, cache):
        return ["train", "--loader", "torchvision", f"data.train={s3_shards}/train", f"data.val={s3_shards}/val",
                f"runtime.out_dir={out}", f"loader.cache_dir={cache}", "loader.cache_gb=0.0001", *RUN]

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert main(args(full, tmp_path / "cache-full")) == 0
    fault_proxy.plan = [0.2] * 1000
    build = loaders.build_loader
    monkeypatch.setattr(loaders, "build_loader", signalling_build(build, 1, 4, signal.SIGTERM))
    assert main(args(stopped, tmp_path / "cache")) == 128 + signal.SIGTERM
    assert "stopped in epoch 1 at step 6" in capsys.readouterr().out
    monkeypatch.setattr(loaders, "build_loader", build)
    assert main(["train", "--resume", str(stopped)]) == 0
    assert "(resuming at epoch 1, step 6)" in capsys.readouterr().out
    _assert_ends_as(full, stopped)
    assert fault_proxy.injected > 10


def test_convert_refuses_a_beton_write_mode_for_shards(jpeg_dataset, tmp_path, capsys):
    assert main(["convert", str(jpeg_dataset / "train"), str(tmp_path / "out"), "--format", "shards",
                 "--write-mode", "raw"]) != 0
    assert "--write-mode raw: shards store JPEGs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_gpu_decode_of_shard_bytes_matches_the_cpu_decode(jpeg_dataset, tmp_path):
    """nvJPEG fed a sharded split's bytes through the external source: the CPU decode's labels, and its pixels within
    the two decoders' noise (tests/test_dali_loader.py compares them on files the same way)."""
    from tests.test_dali_loader import cuda_spec, dali_spec

    shards = data_path("dali:shards", jpeg_dataset / "train", tmp_path)
    gpu = loaders.build_loader("dali", cuda_spec(shards, batch_size=8, seed=3))
    cpu = loaders.build_loader("dali", dali_spec(shards, batch_size=8, seed=3))
    for (on_gpu, gpu_labels), (on_cpu, cpu_labels) in zip(gpu, cpu):
        assert on_gpu.is_cuda and torch.equal(gpu_labels.cpu(), cpu_labels)
        difference = (on_gpu.cpu().float() - on_cpu.float()).abs()
        assert difference.mean() < 3 and difference.quantile(0.99) < 32
