"""Data-parallel set-up from torchrun's environment: NCCL on CUDA, gloo on CPU; one process per device.

A plain `fastimagenet train` (no torchrun) is a world of one: nothing here starts a process group then, and every
helper is a no-op, so the loop has no `if distributed` branches of its own.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from fastimagenet.common.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only rank 0 prints, writes logs, plots and checkpoints."""
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """Rank, world size and local rank as torchrun (or any launcher that sets its variables) exports them."""
    values = {}
    for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(key, str(default))
        try:
            values[key] = int(text)
        except ValueError:
            raise UserError(f"environment: {key}={text!r} is not an integer (launch with torchrun)") from None
    env = DistEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise UserError(f"environment: RANK={env.rank} is not within WORLD_SIZE={env.world_size}")
    return env


def init_process_group(env: DistEnv, device: torch.device) -> None:
    if env.world_size == 1 or dist.is_initialized():
        return
    timeout = timedelta(minutes=30)
    store = _attempt_store(timeout)
    group = {"store": store, "rank": env.rank, "world_size": env.world_size} if store else {}
    if device.type == "cuda":
        # device_id binds the NCCL communicator to this rank's GPU at once (no lazy init on the first collective).
        dist.init_process_group("nccl", device_id=device, timeout=timeout, **group)
    else:
        dist.init_process_group("gloo", timeout=timeout, **group)


def _attempt_store(timeout: timedelta) -> dist.Store | None:
    """The store this torchrun attempt forms its process group in, or None to let init_process_group read env://.

    torchrun's agent serves one store (at MASTER_ADDR:MASTER_PORT; TORCHELASTIC_USE_AGENT_STORE=True) to every attempt
    of a job, and a process group writes its members' addresses there under the same keys each time. After a
    `--max-restarts` restart, a worker may read the address a dead worker of the failed attempt left before its new
    peer replaces it, and the group does not form (gloo: "connectFullMesh ... Connection refused", or both sides
    wait; NCCL exchanges its unique id the same way). So each attempt takes keys of its own, named by
    TORCHELASTIC_RESTART_COUNT. Every worker of one torchrun sees the same count: exact on one machine. Across
    machines each torchrun counts its own restarts; there torchrun needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a new
    store for every rendezvous, which the env:// path takes)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                timeout=timeout)
    return dist.PrefixStore(f"fastimagenet/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent_store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a sync point: callers mark it)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def average_buffers(module: nn.Module) -> None:
    """Average BatchNorm running statistics over the ranks before evaluation. Each rank updates its own from its
    shard (DDP is told not to broadcast buffers every step); the mean is the better estimate, and makes every rank
    evaluate, and rank 0 save, the same model."""
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)


def wrap_ddp(model: nn.Module, env: DistEnv, device: torch.device, bucket_mb: int, static_graph: bool) -> nn.Module:
    """DistributedDataParallel around a model already on its device in its final memory format (and before
    torch.compile, so Dynamo can split the graph at the gradient buckets and overlap the all-reduces).

    Gradients live in the buckets (gradient_as_bucket_view: one copy less per step), which holds only while they are
    zeroed in place: `keeps_gradients(module)` tells the step which zero_grad to call."""
    if env.world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=bucket_mb,
        gradient_as_bucket_view=True,
        static_graph=static_graph,
        # no per-step buffer broadcast (a collective and a compile graph break); BN statistics are averaged over the
        # ranks before each evaluation instead (average_buffers)
        **no_forward_buffer_sync(inspect.signature(nn.parallel.DistributedDataParallel).parameters),
    )


def no_forward_buffer_sync(ddp_parameters) -> dict:
    """DDP's switch off for the buffer broadcast at every forward, in the torch at hand: `forward_sync_buffers`
    from torch 2.13 on (which deprecates the other), `broadcast_buffers` before it. The old switch also skips the
    broadcast of buffers at start-up, where every rank's are the same anyway (the same seed, or the same
    checkpoint)."""
    if "forward_sync_buffers" in ddp_parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def keeps_gradients(module: nn.Module) -> bool:
    """Whether the step must zero the gradients in place rather than drop them (zero_grad(set_to_none=False)): under
    DDP they are views into its all-reduce buckets, and a gradient set to None is a new tensor next step that DDP
    copies into its bucket again (torch's DDP docs: set_to_none "destroys the bucket view alias every
    iteration"). Alone, dropping them saves the memset."""
    return isinstance(module, nn.parallel.DistributedDataParallel)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
