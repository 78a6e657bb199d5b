"""`fastimagenet eval`: a finished run, a checkpoint or an exported state_dict scored on any folder, resolution or
crop, with the model and loader set up as training sets them up (fastimagenet/training_setup.py).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastimagenet.checkpoint import load_checkpoint
from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.errors import UserError
from fastimagenet.config import Config, apply_overrides, from_dict, from_saved, validate
from fastimagenet.distributed import env_from_torchrun, init_process_group, shutdown
from fastimagenet.evaluation import evaluate
from fastimagenet.export import plain_state_dict
from fastimagenet.models import ARCHS, Normalized
from fastimagenet.plan import build_plan
from fastimagenet.runtime import compile_module, resolve_runtime
from fastimagenet.training_setup import build_val_loader, model_of, to_device


@dataclass
class EvalOptions:
    source: str  # a run directory, a checkpoint, or an exported state_dict (with `arch`)
    data: str  # the split to score: an ImageFolder, or a .beton for the ffcv loader
    loader: str = ""  # "": the run's loader
    resolution: int = 0  # 0: the run's eval resolution
    crop_ratio: float = 0.0  # 0: the run's
    tta_flip: bool | None = None  # None: the run's
    batch_size: int = 0  # global; 0: the run's eval batch
    checkpoint: str = ""  # for a run directory: best | last ("": best when there is one)
    ema: bool = False
    arch: str = ""  # for an exported state_dict
    per_class: str = ""  # CSV to write: class, images, top1
    overrides: list[str] = field(default_factory=list)


@dataclass
class _Source:
    weights: dict
    cfg: Config
    classes: list[str] | None  # None: the data's own classes (an exported state_dict carries none)
    name: str  # what was loaded, for the report


def _from_checkpoint(path: Path, state: dict, cfg: Config | None, ema: bool) -> _Source:
    weights = state["model"]
    if ema:
        if "ema" not in state:
            raise UserError(f"{path}: the run kept no EMA weights (optim.ema_decay=0); drop --ema")
        weights = state["ema"]["module"]
    cfg = cfg or from_dict(state["config"], str(path))
    classes = state.get("classes")
    if classes is None and cfg.data.train and Path(cfg.data.train).is_dir():  # checkpoints of older runs
        from fastimagenet.dataset_tools.scan import scan_image_folder

        classes = scan_image_folder(cfg.data.train).classes
    return _Source(plain_state_dict(weights), cfg, classes, f"{path} (epoch {state['epoch']}"
                   + (", EMA)" if ema else ")"))


def load_source(opts: EvalOptions) -> _Source:
    path = Path(opts.source)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise UserError(f"{path}: not a run directory (no config.yaml)")
        name = opts.checkpoint or ("best" if (path / "best.pt").is_file() else "last")
        checkpoint = path / f"{name}.pt"
        return _from_checkpoint(checkpoint, load_checkpoint(checkpoint), from_saved(path / "config.yaml"), opts.ema)
    if not path.is_file():
        raise UserError(f"{path}: no such run directory or checkpoint")
    if opts.checkpoint:
        raise UserError("--checkpoint picks a file of a run directory; SOURCE is already a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any reader error means "not a checkpoint"
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "model" in state and "epoch" in state:
        return _from_checkpoint(path, state, None, opts.ema)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: neither a fastimagenet checkpoint nor a state_dict")
    if not opts.arch:
        raise UserError(f"{path}: a plain state_dict does not say its architecture; add --arch "
                        f"({', '.join(ARCHS)})")
    if opts.ema:
        raise UserError(f"{path}: --ema needs a checkpoint (an export already holds one set of weights)")
    cfg = Config()
    apply_overrides(cfg, [f"model.arch={opts.arch}"])
    weights = plain_state_dict(state)
    if opts.arch.endswith("_small") and "conv1.weight" in weights:
        cfg.model.width = weights["conv1.weight"].shape[0]  # the stem's channels are the width
    return _Source(weights, cfg, None, str(path))


def _eval_config(src: _Source, opts: EvalOptions) -> Config:
    """The run's own settings, then what the command line changes."""
    cfg = copy.deepcopy(src.cfg)
    overrides = [f"data.val={opts.data}"]
    for key, value in (("loader.name", opts.loader), ("data.val_resolution", opts.resolution),
                       ("data.crop_ratio", opts.crop_ratio), ("data.val_batch_size", opts.batch_size)):
        if value:
            overrides.append(f"{key}={value}")
    if opts.tta_flip is not None:
        overrides.append(f"runtime.tta_flip={str(opts.tta_flip).lower()}")
    apply_overrides(cfg, overrides + list(opts.overrides))
    validate(cfg)
    return cfg


def _check_classes(data: str, classes: list[str] | None, source: str) -> None:
    if classes is None or not Path(data).is_dir():
        return  # a .beton's classes are checked by the ffcv loader against its sidecar
    found = sorted(p.name for p in Path(data).iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{data}: classes {', '.join(unknown[:5])} are not among the {len(classes)} classes the "
                        f"model of {source} was trained on")


def run_eval(opts: EvalOptions) -> dict:
    """Score SOURCE on DATA; under torchrun each process scores its shard and the figures are summed."""
    if not opts.data:
        raise UserError("eval: give the split to score with --data")
    src = load_source(opts)
    cfg = _eval_config(src, opts)
    plan = build_plan(cfg)
    _check_classes(cfg.data.val, src.classes, src.name)
    num_classes = src.weights["fc.weight"].shape[0] if "fc.weight" in src.weights else 0
    env = env_from_torchrun()
    rt = resolve_runtime(cfg, env.local_rank)
    init_process_group(env, rt.device)
    try:
        loader = build_val_loader(cfg, plan, rt, env, src.classes, num_classes)
        if len(loader.classes) != num_classes:
            raise UserError(f"{cfg.data.val}: has {len(loader.classes)} classes but the model of {src.name} "
                            f"predicts {num_classes}")
        model = model_of(cfg, num_classes)
        try:
            model.load_state_dict(src.weights)
        except RuntimeError as exc:
            raise UserError(f"{src.name}: the weights do not fit {cfg.model.arch} "
                            f"({str(exc).splitlines()[0]})") from None
        module = Normalized(to_device(model, cfg, rt)).to(rt.device)
        forward = compile_module(module, rt, cfg.runtime.compile_backend, 1)
        start = time.perf_counter()
        scores = evaluate(forward, module, loader, rt, plan.val_batch_size // env.world_size, cfg.runtime.tta_flip,
                          num_classes=num_classes if opts.per_class else 0)
        rt.synchronize()  # sync: the end of the timed evaluation
        seconds = time.perf_counter() - start
    finally:
        shutdown()
    result = {"source": src.name, "data": cfg.data.val, "loader": cfg.loader.name, "top1": scores["val_top1"],
              "top5": scores["val_top5"], "loss": scores["val_loss"], "images": scores["val_images"],
              "images_per_s": scores["val_images"] / seconds, "resolution": plan.val_resolution,
              "crop_ratio": cfg.data.crop_ratio, "tta_flip": cfg.runtime.tta_flip}
    if opts.per_class and env.is_main:
        write_per_class(Path(opts.per_class), loader.classes, scores)
    return result


def write_per_class(path: Path, classes: list[str], scores: dict) -> None:
    rows = ["class,images,top1"]
    for name, images, hits in zip(classes, scores["per_class_images"], scores["per_class_top1_hits"]):
        rows.append(f"{name},{images},{hits / images if images else float('nan'):.6f}")
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(rows) + "\n")


def report(result: dict) -> str:
    """A readable line, then the same figures as one JSON line."""
    line = (f"eval {result['source']} on {result['data']}: top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}, "
            f"loss {result['loss']:.4f}, {result['images']} images at {result['resolution']} px "
            f"({result['images_per_s']:.0f} images/s)")
    return line + "\n" + json.dumps(result)
