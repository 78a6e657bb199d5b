"""`fastimagenet selfcheck`: the first minutes on a new machine, a GPU one above all, before a long run.

It needs no dataset, no internet and no optional package: it writes its own JPEGs and checks what it finds, so it
runs in a stock PyTorch container (torch and torchvision; DALI, FFCV and a compiler for the JPEG region decoder
only where installed). It prints one table (check, result, figure) and writes the same as JSON:
- what is there: torch and its GPU, each loader backend (or the line that installs it), the JPEG region decoder;
- an fp16 first step skipped for an overflow leaves SGD's momentum at zero (fused, as on CUDA; on CPU too);
- on CUDA: two compiled epochs of the real training loop in bf16 and in fp16 with torch raising on any host sync
  outside the loop's deliberate ones, and each installed backend's batches arriving while a long kernel keeps the
  stream busy (a host wait that torch cannot see would let the kernel finish first);
- `bench train` at two resolutions: the training step fed by each installed backend against the synthetic loader.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from fastimagenet import loaders
from fastimagenet.config import OptimConfig, load_config

# On CUDA: ResNet-50 at ImageNet-like sizes, as a recipe trains; on CPU a tiny net and tiny images, as the tests.
_GPU_BENCH = dict(arch="resnet50", width=64, resolutions=(128, 176), batch=128, images=2048, size=320, steps=20)
_CPU_BENCH = dict(arch="resnet10_small", width=8, resolutions=(32, 48), batch=16, images=256, size=64, steps=8)


@dataclass
class Check:
    name: str
    result: str  # "ok", "FAILED" or "skipped"
    figure: str  # what was measured; for a skip or a failure, why


# ------------------------------------------------------------------------------------- checks the tests share
def momentum_after_a_skipped_step(device: torch.device) -> torch.Tensor:
    """A weight of ones after a fused SGD step (momentum 0.9) that the GradScaler skipped for an overflow, as fp16's
    first often is, then a real step with gradient 1 at LR 0.1: 0.9 everywhere when the momentum buffers start
    at zero, whatever the memory they were made from held before."""
    from fastimagenet.optim import build_optimizer

    torch.full((4096,), -535.0, device=device).sum()  # freed memory that uninitialised momentum would read
    model = nn.Linear(4, 1, bias=False).to(device)
    nn.init.ones_(model.weight)
    # built as for CUDA, so fused (torch's fused SGD runs on a CPU too)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", momentum=0.9, weight_decay=0.0), torch.device("cuda"))
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    for gradient in (float("inf"), 1.0):
        for group in optimizer.param_groups:
            group["lr"] = 0.1
        scaler.scale((model.weight * torch.full((4,), gradient, device=device)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return model.weight.detach()


class SyncsRaise:
    """A training loader under which torch raises on any synchronising CUDA call from batch `first` of an epoch
    until its last batch has been trained on: what train_one_epoch does per step, fetching the next batch
    included. Its deliberate syncs lie outside (the throughput clock at step 2, the epoch's end)."""

    def __init__(self, inner, first: int = 3):
        self.inner, self.first = inner, first

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        try:
            for step, batch in enumerate(self.inner):
                if step == self.first:
                    torch.cuda.set_sync_debug_mode("error")
                yield batch
        finally:
            torch.cuda.set_sync_debug_mode(0)


def epochs_without_host_syncs(run) -> list[float]:
    """Every epoch of `run`'s plan through train_one_epoch, its loader wrapped in SyncsRaise: the epochs' losses."""
    from fastimagenet.preemption import StopSignals
    from fastimagenet.train import train_one_epoch

    run.train_loader = SyncsRaise(run.train_loader)
    losses = []
    with StopSignals([], 30) as stop:
        for row in run.plan.rows:
            run.train_loader.reconfigure(row.resolution, row.micro_batch)
            run.train_loader.set_epoch(row.epoch)
            losses.append(train_one_epoch(run, row, stop).loss)
    return losses


def stream_stays_busy(batches: Iterator, steps: int = 20) -> bool:
    """Whether `steps` batches (after 5 of warm-up) come, and are used, under torch's sync debug mode "error" while
    a long kernel keeps the current stream busy, with that kernel still running at the end."""
    for _ in range(5):  # warm-up: workers or pipelines start, first allocations
        next(batches)
    torch.cuda.synchronize()
    torch.cuda._sleep(5_000_000_000)  # clock cycles: a few seconds of a busy stream
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            images, labels = next(batches)
            images.float().mean().add_(labels.sum())  # device work on the batch, as a training step does
        return not torch.cuda.current_stream().query()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------- the command
def _timed(name: str, check: Callable[[], str]) -> Check:
    """Runs one check: its figure, or FAILED with the error's last line (a selfcheck reports, it does not stop)."""
    start = time.perf_counter()
    try:
        figure = check()
    except Exception as exc:  # noqa: BLE001 - every failure is a result to report
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return Check(name, "FAILED", last[:300])
    return Check(name, "ok", f"{figure} ({time.perf_counter() - start:.0f} s)")


def installed_backends() -> dict[str, str | None]:
    """Each loader backend: None where it imports, else the line that installs what it lacks."""
    return {name: loaders.missing_package(name) for name in loaders.NAMES}


def _config(name: str, data: str, cuda: bool, bench: dict, *overrides: str):
    return load_config(None, [f"loader.name={name}", f"data.train={data}", f"model.arch={bench['arch']}",
                              f"model.width={bench['width']}", f"runtime.device={'cuda' if cuda else 'cpu'}",
                              "data.num_classes=4", f"loader.synthetic_samples={bench['images']}", *overrides])


def run_selfcheck(out: Path | None = None, say: Callable[[str], None] = print) -> list[Check]:
    """Every check in turn, each line said as it is done; the JSON file is written to `out` when given."""
    from fastimagenet.bench import bench_train
    from fastimagenet.dataset_tools.synthetic_jpegs import make_jpeg_folder
    from fastimagenet.loaders import image_decode
    from fastimagenet.plan import build_plan
    from fastimagenet.runtime import resolve_runtime
    from fastimagenet.training_setup import build_training

    cuda = torch.cuda.is_available()
    bench = _GPU_BENCH if cuda else _CPU_BENCH
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        say(f"{check.name:<44} {check.result:<8} {check.figure}")

    device = f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}" if cuda else "no CUDA device: CPU only"
    add(Check("torch", "ok", f"{torch.__version__} (CUDA {torch.version.cuda}); {device}"))
    backends = installed_backends()
    for name, install in backends.items():
        add(Check(f"backend {name}", "ok" if install is None else "skipped", install or "installed"))
    region = image_decode.decode_region is not None
    add(Check("JPEG region decoder", "ok" if region else "skipped",
              "built" if region else "not built: JPEGs decode through PIL (`pip install -e .` with gcc, libjpeg-dev)"))
    ready = [name for name, install in backends.items() if install is None]

    def skipped_momentum(where: torch.device) -> str:
        weight = momentum_after_a_skipped_step(where)
        if not torch.equal(weight.cpu(), torch.full((1, 4), 0.9)):
            raise AssertionError(f"the weight after the real step is {weight.flatten().tolist()}, not 0.9")
        return "momentum starts at zero; the next step gives 0.9"

    for where in ["cpu"] + ["cuda"] * cuda:
        add(_timed(f"fp16 first step skipped ({where})", lambda: skipped_momentum(torch.device(where))))

    with tempfile.TemporaryDirectory(prefix="selfcheck-") as tmp:
        scratch = Path(tmp)
        folder = make_jpeg_folder(scratch / "jpegs", classes=4, per_class=bench["images"] // 4, size=bench["size"])
        if cuda:
            for precision in ("bf16", "fp16"):
                def sync_free(precision=precision) -> str:
                    cfg = _config("torchvision", str(folder), cuda, _CPU_BENCH, f"runtime.precision={precision}",
                                  "runtime.compile=true", "runtime.log_interval=100000", "epochs=2",
                                  f"schedule.stages=0,32,{_CPU_BENCH['batch']};1,48,{_CPU_BENCH['batch']}")
                    losses = epochs_without_host_syncs(build_training(cfg, build_plan(cfg), resolve_runtime(cfg),
                                                                      with_val=False))
                    if not all(math.isfinite(loss) for loss in losses):
                        raise AssertionError(f"losses {losses}")
                    return "2 compiled epochs at 32 and 48 px, no host sync between the deliberate ones"

                add(_timed(f"no host sync, compiled {precision}", sync_free))
            for name in ready:
                def busy(name=name) -> str:
                    data = loaders.data_from_folder(name, folder, scratch)
                    cfg = _config(name, data, cuda, _CPU_BENCH, "schedule.stages=0,32,8")
                    run = build_training(cfg, build_plan(cfg), resolve_runtime(cfg), with_val=False)
                    if not stream_stays_busy(iter(run.train_loader)):
                        raise AssertionError("the long kernel had finished: the batches waited for it on the host")
                    return "20 batches came while a long kernel ran"

                add(_timed(f"busy stream, {name}", busy))
        else:
            for what in ("no host sync, compiled bf16/fp16", "busy stream, every backend"):
                add(Check(what, "skipped", "needs CUDA"))
        stages = ";".join(f"{i},{res},{bench['batch']}" for i, res in enumerate(bench["resolutions"]))
        for name in (n for n in ready if n != "synthetic"):
            def throughput(name=name) -> str:
                data = loaders.data_from_folder(name, folder, scratch)
                cfg = _config(name, data, cuda, bench, f"schedule.stages={stages}",
                              f"epochs={len(bench['resolutions'])}")
                rows = list(bench_train(cfg, steps=bench["steps"], rounds=2))
                return "; ".join(f"{r['resolution']} px: {r['images_per_s']:.0f} images/s, synthetic "
                                 f"{r['synthetic_images_per_s']:.0f}, efficiency {r['loader_efficiency']:.2f}"
                                 for r in rows)

            add(_timed(f"bench train {bench['arch']}, {name}", throughput))
    if out is not None:
        out.write_text(json.dumps({"checks": [asdict(check) for check in checks]}, indent=1) + "\n")
    return checks
