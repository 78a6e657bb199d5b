"""The GPU path's decisions, each tested on CPU, and the GPU behaviours themselves (`-m gpu`, run by `make test-gpu`
on a machine with CUDA): no host-device sync in a steady training step, for every loader and precision."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastimagenet.common.errors import UserError
from fastimagenet.config import OptimConfig, from_saved, load_config, save_config
from fastimagenet.ema import ModelEma
from fastimagenet.models import Normalized, build_model
from fastimagenet.optim import build_optimizer
from fastimagenet.plan import build_plan
from fastimagenet.runtime import (Runtime, compile_module, missing_cuda_warning, recompile_limit, resolve_runtime,
                                  sync_bn_compile_warning)
from fastimagenet.selfcheck import epochs_without_host_syncs, momentum_after_a_skipped_step, stream_stays_busy
from fastimagenet.training_setup import build_training
from tests.conftest import LEARNING_RUN, TINY_RUN, data_path, train


# ---------------------------------------------------------------------------------------------- decisions (CPU)
def test_normalisation_constants_are_buffers_that_move_with_the_module_and_are_not_saved():
    module = Normalized(nn.Identity())
    assert {name for name, _ in module.named_buffers()} == {"mean", "std"}
    assert module.state_dict() == {}  # checkpoints and exports hold the bare network only
    out = module(torch.full((1, 3, 2, 2), 124, dtype=torch.uint8))
    assert abs(float(out[0, 0, 0, 0])) < 0.01


def test_optimizers_are_fused_on_cuda_only():
    params = nn.Linear(2, 2)
    for name in ("sgd", "adamw"):
        optim = OptimConfig(name=name)
        assert build_optimizer(params, optim, torch.device("cuda")).defaults["fused"] is True
        assert not build_optimizer(params, optim, torch.device("cpu")).defaults["fused"]


def test_a_skipped_first_fp16_step_leaves_fused_sgd_momentum_at_zero():
    """torch's fused SGD makes its momentum with empty_like and skips its kernel on an overflow: the buffers are
    zeros before the first step (optim.zero_momentum_buffers), so the next step is right. Fused SGD runs on CPU."""
    assert torch.equal(momentum_after_a_skipped_step(torch.device("cpu")), torch.full((1, 4), 0.9))


def test_ddp_is_told_not_to_broadcast_buffers_in_the_words_of_the_torch_at_hand():
    """torch >= 2.13 names it forward_sync_buffers; older torches (stock 2.11/2.12 containers) know only
    broadcast_buffers, and would stop every multi-GPU run with a TypeError on the new name."""
    import inspect

    from fastimagenet.distributed import no_forward_buffer_sync

    assert no_forward_buffer_sync(inspect.signature(nn.parallel.DistributedDataParallel).parameters) == {
        "forward_sync_buffers": False}
    assert no_forward_buffer_sync({"module": None, "broadcast_buffers": None}) == {"broadcast_buffers": False}


def test_ema_update_copies_integer_buffers_with_one_multi_tensor_copy():
    model = build_model("resnet10_small", 3, width=8)
    ema = ModelEma(model, decay=0.9)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.num_batches_tracked.fill_(7)
    ema.update()
    counts = {k: int(v) for k, v in ema.module.state_dict().items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {7}


def test_recompile_limit_covers_the_plan_and_hitting_it_is_an_error():
    """Past the limit Dynamo would silently run eager: compile_module makes that an error instead."""
    assert recompile_limit(3) == 8 and recompile_limit(10) == 22
    torch._dynamo.reset()
    forward = compile_module(nn.Conv2d(3, 3, 1), Runtime(torch.device("cpu"), "fp32", True), "eager", 1)
    for size in range(1, 9):  # 8 shapes: within the limit
        forward(torch.zeros(1, 3, size, size))
    with pytest.raises(Exception, match="fail_on_recompile_limit_hit"):
        forward(torch.zeros(1, 3, 9, 9))
    torch._dynamo.reset()


def test_the_compiled_forward_is_the_training_module_itself(jpeg_dataset):
    """torch.compile gets the module the step trains (the DDP wrapper under torchrun): no lambda around it, so under
    DDP Dynamo sees the wrapper and splits the graph at its gradient buckets."""
    cfg = load_config(None, [*TINY_RUN, f"data.train={jpeg_dataset / 'train'}", "runtime.compile=true",
                             "runtime.compile_backend=eager", "schedule.stages=0,32,8", "epochs=1"])
    run = build_training(cfg, build_plan(cfg), resolve_runtime(cfg), with_val=False)
    assert run.forward._orig_mod is run.train_module


def test_warnings_for_a_driver_too_old_and_for_sync_bn_under_compile():
    assert "driver is probably older" in missing_cuda_warning("/usr/bin/nvidia-smi", cuda_available=False)
    assert missing_cuda_warning("/usr/bin/nvidia-smi", cuda_available=True) is None
    assert missing_cuda_warning(None, cuda_available=False) is None  # no NVIDIA driver: CPU is expected
    assert "#161302" in sync_bn_compile_warning(True, True)
    assert sync_bn_compile_warning(True, False) is None and sync_bn_compile_warning(False, True) is None


# ---------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_a_skipped_first_fp16_step_leaves_fused_sgd_momentum_at_zero_on_cuda():
    assert torch.equal(momentum_after_a_skipped_step(torch.device("cuda")).cpu(), torch.full((1, 4), 0.9))


EVERY_BACKEND = ["torchvision", "dali", "ffcv", "synthetic"]


def _cuda_training(name: str, data, tmp_path, *overrides: str):
    """A CUDA run's training set-up (no validation) on `name`'s form of the tiny JPEG set."""
    train = data_path(name, data / "train", tmp_path)
    cfg = load_config(None, [*TINY_RUN, f"loader.name={name}", f"data.train={train}", "runtime.device=cuda",
                             "optim.ema_decay=0.9", "loader.synthetic_samples=96", "data.num_classes=4", *overrides])
    return build_training(cfg, build_plan(cfg), resolve_runtime(cfg), with_val=False)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", EVERY_BACKEND)
def test_compiled_epochs_never_sync_the_host_between_their_deliberate_syncs(name, precision, jpeg_dataset, tmp_path):
    """Two compiled epochs at two shapes through train_one_epoch (LR per step, loss accumulation, EMA, the loader's
    next batch) with torch raising on any synchronising call after each epoch's warm-up: a pageable copy, an
    .item(), a blocking stream wait. runtime.log_interval is past the epoch, so its one read is not in the way."""
    run = _cuda_training(name, jpeg_dataset, tmp_path, f"runtime.precision={precision}", "runtime.compile=true",
                         "schedule.stages=0,32,8;1,48,8", "epochs=2", "runtime.log_interval=1000")
    assert all(math.isfinite(loss) for loss in epochs_without_host_syncs(run))


@pytest.mark.gpu
@pytest.mark.parametrize("name", EVERY_BACKEND)
def test_batches_come_while_a_long_kernel_keeps_the_stream_busy(name, jpeg_dataset, tmp_path):
    """A host wait inside a loader, which torch's sync debug mode cannot see (DALI's, FFCV's own threads), would
    let the kernel finish before the batches came."""
    run = _cuda_training(name, jpeg_dataset, tmp_path, "schedule.stages=0,32,2", "epochs=1")
    assert stream_stays_busy(iter(run.train_loader))


@pytest.mark.gpu
def test_batches_copied_ahead_on_a_side_stream_are_the_host_batches():
    from fastimagenet.loaders.base import copied_ahead

    host = [(torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8).pin_memory(), torch.arange(4).pin_memory())
            for _ in range(5)]
    out = list(copied_ahead(iter(host), torch.device("cuda")))
    torch.cuda.synchronize()
    assert len(out) == 5
    for (images, labels), (on_device, labels_there) in zip(host, out):
        assert on_device.is_cuda and on_device.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(on_device.cpu(), images.permute(0, 3, 1, 2)) and torch.equal(labels_there.cpu(), labels)


@pytest.mark.parametrize("mode, graphs", [("default", False), ("reduce-overhead", True), ("max-autotune", True)])
def test_the_compile_mode_reaches_inductor_and_says_when_steps_replay_cuda_graphs(mode, graphs):
    """runtime.compile_mode is torch.compile's mode; the loop marks each step's start only where CUDA graphs replay
    (on CUDA), since a graph's outputs are overwritten by its next replay."""
    forward = compile_module(nn.Linear(2, 2), Runtime(torch.device("cpu"), "fp32", True, mode), "inductor", 1)
    assert forward.get_compiler_config()["triton.cudagraphs"] is graphs  # read before anything compiles
    assert Runtime(torch.device("cuda", 0), "bf16", True, mode).cuda_graphs is graphs
    assert not Runtime(torch.device("cpu"), "fp32", True, mode).cuda_graphs
    assert not Runtime(torch.device("cuda", 0), "bf16", False, mode).cuda_graphs


def test_a_compile_mode_is_recorded_and_belongs_to_inductor(tmp_path):
    cfg = load_config(None, ["runtime.compile_mode=reduce-overhead"])
    assert cfg.runtime.compile_mode == "reduce-overhead"
    save_config(cfg, tmp_path / "config.yaml")
    assert from_saved(tmp_path / "config.yaml").runtime.compile_mode == "reduce-overhead"
    with pytest.raises(UserError, match="must be one of default, reduce-overhead, max-autotune"):
        load_config(None, ["runtime.compile_mode=fast"])
    with pytest.raises(UserError, match="a mode of the inductor backend, not of 'eager'"):
        load_config(None, ["runtime.compile_mode=max-autotune", "runtime.compile_backend=eager"])


@pytest.mark.gpu
def test_cuda_graphs_train_across_a_shape_change_and_evaluate_with_flip_tta(jpeg_dataset, tmp_path):
    """reduce-overhead: one CUDA graph per shape of the plan, replayed; the flipped second forward of TTA must not
    overwrite the first one's logits."""
    metrics = train("torchvision", jpeg_dataset, tmp_path / "run", "runtime.device=cuda", "runtime.compile=true",
                    "runtime.compile_mode=reduce-overhead", "runtime.tta_flip=true", "epochs=4",
                    "schedule.stages=0,32,16;2,48,16", "optim.ema_decay=0.9")
    assert [m["resolution"] for m in metrics] == [32, 32, 48, 48]
    assert metrics[-1]["val_top1"] >= 0.6 and math.isfinite(metrics[-1]["ema_val_loss"])


@pytest.mark.gpu
def test_a_compiled_cuda_run_with_ema_learns_across_a_shape_change_and_evaluates_both_models(jpeg_dataset, tmp_path):
    """Train, eval and EMA graphs compiled, a new training shape in epoch 2, both models validated each epoch."""
    metrics = train("torchvision", jpeg_dataset, tmp_path / "run", "runtime.device=cuda", "runtime.compile=true",
                    "epochs=4", "schedule.stages=0,32,16;2,48,16", "optim.ema_decay=0.9")
    assert [m["resolution"] for m in metrics] == [32, 32, 48, 48]
    assert metrics[-1]["val_top1"] >= 0.6 and math.isfinite(metrics[-1]["ema_val_loss"])


@pytest.mark.gpu
def test_a_cuda_run_stopped_inside_an_epoch_resumes_there(jpeg_dataset, tmp_path, monkeypatch, capsys):
    """SIGTERM at epoch 1, step 3, then `--resume`: it continues at that step and ends with every epoch once. (On a
    GPU the float sums are not bit-identical from run to run, so the figures are compared loosely.)"""
    import signal

    from fastimagenet import loaders
    from fastimagenet.cli import main
    from fastimagenet.metrics import read_metrics
    from tests.step_signals import signalling_build

    args = ["train", "--loader", "torchvision", f"data.train={jpeg_dataset / 'train'}",
            f"data.val={jpeg_dataset / 'val'}", *LEARNING_RUN, "runtime.device=cuda", "runtime.compile=true",
            "epochs=3", "schedule.stages=0,32,8", "runtime.preempt_grace_s=600"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert main([*args, f"runtime.out_dir={full}"]) == 0
    build = loaders.build_loader
    monkeypatch.setattr(loaders, "build_loader", signalling_build(build, 1, 3, signal.SIGTERM))
    assert main([*args, f"runtime.out_dir={stopped}"]) == 128 + signal.SIGTERM
    monkeypatch.setattr(loaders, "build_loader", build)
    assert main(["train", "--resume", str(stopped)]) == 0
    assert "(resuming at epoch 1, step 5)" in capsys.readouterr().out
    a, b = read_metrics(full), read_metrics(stopped)
    assert [r["epoch"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torchvision", "dali"])
def test_torchrun_trains_on_two_gpus_with_nccl(name, jpeg_dataset, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from pathlib import Path
    import sys

    from fastimagenet.metrics import read_metrics
    from tests.processes import run_to_end

    out = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
               "fastimagenet", "train", "--loader", name, f"data.train={jpeg_dataset / 'train'}",
               f"data.val={jpeg_dataset / 'val'}", f"runtime.out_dir={out}", *LEARNING_RUN, "runtime.device=cuda",
               "epochs=3", "schedule.stages=0,32,16"]
    result = run_to_end(command, tmp_path / "torchrun.log")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "cuda:0 x 2 process(es)" in result.stdout
    metrics = read_metrics(out)
    assert [m["val_images"] for m in metrics] == [32] * 3 and metrics[-1]["val_top1"] >= 0.5
