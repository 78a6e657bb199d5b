"""The GPU path's decisions, each tested on CPU, and the GPU behaviours themselves (`-m gpu`, run by `make test-gpu`
on a machine with CUDA): no host-device sync in a steady training step, for every loader and precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastimagenet.config import OptimConfig, load_config
from fastimagenet.ema import ModelEma
from fastimagenet.models import Normalized, build_model
from fastimagenet.optim import build_optimizer
from fastimagenet.plan import build_plan
from fastimagenet.runtime import (Runtime, compile_module, missing_cuda_warning, recompile_limit, resolve_runtime,
                                  sync_bn_compile_warning)
from fastimagenet.train import train_step
from fastimagenet.training_setup import build_training
from tests.conftest import TINY_RUN, data_path


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


def _step_after_a_skipped_one(device: torch.device) -> torch.Tensor:
    """A weight of ones after an optimizer step skipped for an overflow (as fp16's first often is), then a real one
    with gradient 1 at LR 0.1: 0.9 whatever the memory the optimizer's buffers were made from held before."""
    torch.full((4096,), -535.0, device=device).sum()  # freed memory that uninitialised momentum would read
    model = nn.Linear(4, 1, bias=False).to(device)
    nn.init.ones_(model.weight)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", momentum=0.9, weight_decay=0.0), torch.device("cuda"))
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    for gradient in (float("inf"), 1.0):
        optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = 0.1
        scaler.scale((model.weight * torch.full((4,), gradient, device=device)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return model.weight.detach()


def test_a_skipped_first_fp16_step_leaves_fused_sgd_momentum_at_zero():
    """torch's fused SGD makes its momentum with empty_like and skips its kernel on an overflow: the buffers are
    zeros before the first step (optim.zero_momentum_buffers), so the next step is right. Fused SGD runs on CPU."""
    assert torch.equal(_step_after_a_skipped_one(torch.device("cpu")), torch.full((1, 4), 0.9))


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
    assert torch.equal(_step_after_a_skipped_one(torch.device("cuda")).cpu(), torch.full((1, 4), 0.9))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["torchvision", "dali", "ffcv", "synthetic"])
def test_steady_state_training_steps_never_sync_the_host(name, precision, jpeg_dataset, tmp_path):
    """20 training steps (loader, forward, backward, optimizer, EMA) after warm-up, with torch raising on any
    synchronising call: a pageable copy, an .item(), a blocking stream wait."""
    train = data_path(name, jpeg_dataset / "train", tmp_path)
    cfg = load_config(None, [*TINY_RUN, f"loader.name={name}", f"data.train={train}", "runtime.device=cuda",
                             f"runtime.precision={precision}", "schedule.stages=0,32,8", "epochs=1",
                             "optim.ema_decay=0.9", "loader.synthetic_samples=64", "data.num_classes=4"])
    run = build_training(cfg, build_plan(cfg), resolve_runtime(cfg), with_val=False)
    run.train_module.train()

    def batches():
        epoch = 0
        while True:
            run.train_loader.set_epoch(epoch)
            yield from run.train_loader
            epoch += 1

    stream = batches()
    for _ in range(5):  # warm-up: workers, cuDNN autotuning, allocator pools
        train_step(run, *next(stream), accum_steps=1, update=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            loss = train_step(run, *next(stream), accum_steps=1, update=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()
