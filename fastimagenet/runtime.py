"""Where and how the model runs: device, mixed precision, torch.compile. Resolved once from the config."""

from __future__ import annotations

import contextlib
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from fastimagenet.common.errors import UserError
from fastimagenet.config import Config

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # bf16 | fp16 | fp32
    compile: bool
    compile_mode: str = "default"  # torch.compile's mode (runtime.compile_mode)

    @property
    def cuda_graphs(self) -> bool:
        """Whether compiled code replays CUDA graphs: inductor's reduce-overhead and max-autotune modes turn on
        triton.cudagraphs (torch/_inductor: list_mode_options), which applies on CUDA only."""
        return self.compile and self.device.type == "cuda" and self.compile_mode in ("reduce-overhead", "max-autotune")

    def step_begin(self) -> None:
        """A new training step starts. Under CUDA graphs the outputs of the last step's graphs may be overwritten from
        here on; said explicitly because gradient accumulation and evaluation between steps make the boundary
        something torch cannot infer."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return _AMP_DTYPES[self.precision]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def resolve_runtime(cfg: Config, local_rank: int = 0) -> Runtime:
    """Hardware presets: CUDA gets bf16 + compile; CPU gets fp32 (bf16 is emulated, slow) and eager mode.
    Under torchrun each process takes the GPU of its local rank."""
    rt = cfg.runtime
    if rt.device == "cuda" and not torch.cuda.is_available():
        raise UserError("config: runtime.device=cuda but no CUDA device is available (use runtime.device=auto)")
    cuda = rt.device == "cuda" or (rt.device == "auto" and torch.cuda.is_available())
    warning = missing_cuda_warning(shutil.which("nvidia-smi"), torch.cuda.is_available()) if not cuda else None
    if warning and local_rank == 0:
        print(warning)
    if cuda and local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPUs "
                        "(--nproc_per_node must not exceed the GPU count)")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    precision = rt.precision if rt.precision != "auto" else ("bf16" if cuda else "fp32")
    if precision == "fp16" and not cuda:
        raise UserError("config: runtime.precision=fp16 needs CUDA (use bf16 or fp32 on CPU)")
    compile_ = rt.compile == "true" or (rt.compile == "auto" and cuda)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, precision, compile_, rt.compile_mode)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compile_module(module: torch.nn.Module, rt: Runtime, backend: str, distinct_shapes: int):
    """The module, compiled (the DDP wrapper itself when there is one: the documented form, which lets Dynamo split
    the graph at the gradient buckets). Compile with static shapes: each (resolution, batch) gets its own graph instead of one slower dynamic graph
    (the default would recompile the second shape as dynamic). The recompile limit must cover every shape the
    schedule will show, or Dynamo would silently fall back to eager."""
    if not rt.compile:
        return module
    limit = recompile_limit(distinct_shapes)
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.accumulated_recompile_limit = max(256, limit)
    # Past the limit Dynamo would run the rest of the run in eager mode, several times slower, with one log line
    # as the only trace. The limit covers every shape the plan can show, so hitting it means a guard we did not
    # expect: stop with Dynamo's error instead (a resume continues the run, with a fresh cache).
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    mode = None if rt.compile_mode == "default" else rt.compile_mode
    return torch.compile(module, dynamic=False, backend=backend, mode=mode)


def recompile_limit(distinct_shapes: int) -> int:
    """Cache entries one compiled code object may need: each shape in train mode and again inside DDP's no_sync
    (accumulation micro-steps flip a guarded flag), the eval shape for the model and for its EMA copy (which run
    the same forward code)."""
    return max(8, 2 * distinct_shapes + 2)


def sync_bn_compile_warning(sync_bn_active: bool, compile_: bool) -> str | None:
    if sync_bn_active and compile_:
        return ("warning: model.sync_bn=true with torch.compile: SyncBatchNorm breaks the compiled graph at every "
                "BatchNorm (pytorch/pytorch#161302), so much of the step runs eagerly; consider runtime.compile=false "
                "or model.sync_bn=false with a larger per-GPU batch")
    return None


def missing_cuda_warning(nvidia_smi: str | None, cuda_available: bool) -> str | None:
    """An NVIDIA driver is installed (nvidia-smi exists) but this torch build cannot use it: usually a driver
    older than the CUDA version torch was built for. Said aloud, so runtime.device=auto does not quietly train on
    the CPU."""
    if nvidia_smi is None or cuda_available:
        return None
    return (f"warning: {nvidia_smi} exists but torch {torch.__version__} (built for CUDA {torch.version.cuda}) "
            "sees no usable GPU; the NVIDIA driver is probably older than this build needs (check `nvidia-smi` "
            "for the driver's CUDA version). Training on the CPU.")
