"""`fastimagenet export RUN_DIR OUT`: a run's weights in a form that works outside fastimagenet, and beside them
(OUT.json) everything inference needs to reproduce the run's accuracy.

- OUT.pt2: a self-contained program (`torch.export`): network and input normalisation, run with
  `torch.export.load("OUT.pt2").module()(images)` on uint8 RGB NCHW images of any batch size and resolution. No
  fastimagenet needed; the only format for a BlurPool model outside this package.
- OUT.pt: a plain state_dict (no optimizer state, none of the `module.` (DDP) or `_orig_mod.` (torch.compile)
  prefixes) for `torchvision.models.resnetNN(num_classes=...)` (the ImageNet archs), or for
  `fastimagenet.models.build_model` (the *_small archs). A BlurPool model is refused unless --allow-blurpool: its
  keys load into torchvision's ResNet, which has no blur layers and so computes something else.

OUT.json: the architecture and its options, the class names in label order, the input normalisation and scale, the
train and eval resolutions and crop ratio, and where the weights came from (run, checkpoint, epoch, EMA, accuracy).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from fastimagenet.checkpoint import atomic_torch_save, load_checkpoint
from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.errors import UserError
from fastimagenet.config import Config, set_key, _flatten

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def plain_state_dict(state_dict: dict) -> dict:
    """Keys as the bare model names them, tensors on the CPU."""
    plain = {}
    for key, tensor in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        plain[key] = tensor.detach().cpu().clone()
    return plain


def _checkpoint_file(run_dir: Path, checkpoint: str, ema: bool) -> Path:
    """`best` with --ema is the epoch best for the EMA (best-ema.pt), not the one best for the raw weights."""
    if checkpoint == "best" and ema:
        if (run_dir / "best-ema.pt").is_file():
            return run_dir / "best-ema.pt"
        return _best_kept_for_ema(run_dir)
    return run_dir / f"{checkpoint}.pt"


def _best_kept_for_ema(run_dir: Path) -> Path:
    """Runs written before best-ema.pt existed: among the checkpoints kept, the epoch with the best ema_val_top1."""
    from fastimagenet.metrics import read_metrics

    kept = {int(p.stem.removeprefix("best-epoch")): p for p in run_dir.glob("best-epoch*.pt")}
    if (run_dir / "last.pt").is_file():
        kept.setdefault(load_checkpoint(run_dir / "last.pt")["epoch"], run_dir / "last.pt")
    scores = {}
    if (run_dir / "metrics.jsonl").is_file():
        scores = {r["epoch"]: r["ema_val_top1"] for r in read_metrics(run_dir) if "ema_val_top1" in r}
    ranked = sorted((e for e in kept if e in scores), key=lambda e: (-scores[e], e))
    return kept[ranked[0]] if ranked else run_dir / "best.pt"


def _config_of(state: dict, source: Path) -> Config:
    cfg = Config()
    for key, value in _flatten(state.get("config") or {}).items():
        try:
            set_key(cfg, key, value, str(source))
        except UserError:
            pass  # a key this version no longer has: the model keys below are what matter
    return cfg


def inference_info(cfg: Config, state: dict, weights: dict, *, fmt: str, source: Path, ema: bool,
                   run_dir: Path) -> dict:
    """What OUT.json holds: enough to load the model, feed it as it was trained and read its output."""
    from fastimagenet.metrics import read_metrics
    from fastimagenet.models import MEAN_255, STD_255
    from fastimagenet.plan import build_plan

    plan = build_plan(cfg)
    num_classes = int(weights["fc.weight"].shape[0])
    arch, small = cfg.model.arch, cfg.model.arch.endswith("_small")
    if fmt == "torch.export":
        load = "torch.export.load(PATH).module()  # input: uint8 RGB NCHW, normalisation inside"
    elif small or cfg.model.blurpool:
        width = f", width={cfg.model.width}" if small else ""
        load = (f"fastimagenet.models.build_model('{arch}', {num_classes}{width}, "
                f"blurpool={cfg.model.blurpool}).load_state_dict(torch.load(PATH))")
    else:
        load = f"torchvision.models.{arch}(num_classes={num_classes}).load_state_dict(torch.load(PATH))"
    epoch = state["epoch"]
    scores = {}
    if (run_dir / "metrics.jsonl").is_file():
        scores = {r["epoch"]: r for r in read_metrics(run_dir)}
    key = "ema_val_top1" if ema else "val_top1"
    return {
        "format": fmt,
        "load": load,
        "arch": arch,
        "width": cfg.model.width if small else 64,
        "blurpool": cfg.model.blurpool,
        "torchvision_compatible": not small and not cfg.model.blurpool,
        "num_classes": num_classes,
        "classes": state.get("classes"),  # label i is classes[i]; null for checkpoints that did not record them
        "input": {
            "channels": "RGB", "layout": "NCHW",
            "dtype": "uint8, values 0..255" if fmt == "torch.export" else "float32",
            "normalization": ("inside the program" if fmt == "torch.export" else
                              "x = (pixels / 255 - mean) / std, per channel"),
        },
        "mean": [m / 255 for m in MEAN_255],  # of pixels / 255
        "std": [s / 255 for s in STD_255],
        "train_resolution": plan.rows[-1].resolution,  # the last training stage's
        "eval_resolution": plan.val_resolution,
        "crop_ratio": cfg.data.crop_ratio,
        "eval_transform": ("take the centred square of side crop_ratio x the shorter image side, resize it to "
                           "eval_resolution x eval_resolution"),
        "tta_flip": cfg.runtime.tta_flip,
        "source": {"run_dir": str(run_dir), "checkpoint": source.name, "epoch": epoch, "ema": ema,
                   "val_top1": scores.get(epoch, {}).get(key)},
    }


def export(run_dir: Path, out: Path, checkpoint: str = "best", ema: bool = False,
           allow_blurpool: bool = False) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    if out.suffix not in (".pt", ".pt2", ".pth"):
        raise UserError(f"{out}: the output's extension picks the format: .pt2 (self-contained torch.export "
                        "program) or .pt (state_dict)")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: output directory does not exist")
    source = _checkpoint_file(run_dir, checkpoint, ema)
    state = load_checkpoint(source)
    weights = state["model"]
    if ema:
        if "ema" not in state:
            raise UserError(f"{source}: the run kept no EMA weights (optim.ema_decay=0)")
        weights = state["ema"]["module"]
    weights = plain_state_dict(weights)
    cfg = _config_of(state, source)
    fmt = "torch.export" if out.suffix == ".pt2" else "state_dict"
    if fmt == "state_dict" and cfg.model.blurpool and not allow_blurpool:
        raise UserError(f"{run_dir}: a BlurPool model (model.blurpool=true): its state_dict loads without an error "
                        "into a ResNet without blur layers (torchvision's, or build_model without blurpool=True), "
                        f"which computes something else and scores lower. Export {out.with_suffix('.pt2')} "
                        "(self-contained, runs without fastimagenet), or pass --allow-blurpool to write the "
                        "state_dict for fastimagenet.models.build_model(..., blurpool=True)")
    info = inference_info(cfg, state, weights, fmt=fmt, source=source, ema=ema, run_dir=run_dir)
    if fmt == "torch.export":
        _save_program(cfg, weights, info, out)
    else:
        atomic_torch_save(weights, out)
    meta = out.with_name(out.name + ".json")
    with atomic_output(meta) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")
    what = "EMA weights" if ema else "weights"
    print(f"{out}: {cfg.model.arch}{' + BlurPool' if cfg.model.blurpool else ''} {what} of epoch {state['epoch']} "
          f"({source.name}, {fmt}); how to use it: {meta}")
    return out


def _save_program(cfg: Config, weights: dict, info: dict, out: Path) -> None:
    """Normalisation + network in eval mode, traced by torch.export for any batch size and resolution."""
    from fastimagenet.models import Normalized
    from fastimagenet.training_setup import model_of

    model = model_of(cfg, info["num_classes"])
    model.load_state_dict(weights)
    module = Normalized(model).eval()
    side = info["eval_resolution"]
    example = torch.zeros(2, 3, side, side, dtype=torch.uint8)
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes={"images": dims})
    buffer = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer; the file is written atomically
    torch.export.save(program, buffer)
    with atomic_output(out) as tmp:
        tmp.write_bytes(buffer.getvalue())
