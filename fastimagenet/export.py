"""`fastimagenet export RUN_DIR OUT.pt`: a plain state_dict that the run's architecture loads with
`load_state_dict` (e.g. `torchvision.models.resnet50(num_classes=...)`), with no optimizer state and none of the
`module.` (DDP) or `_orig_mod.` (torch.compile) prefixes."""

from __future__ import annotations

from pathlib import Path

from fastimagenet.checkpoint import atomic_torch_save, load_checkpoint
from fastimagenet.errors import UserError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def plain_state_dict(state_dict: dict) -> dict:
    """Keys as the bare model names them, tensors on the CPU."""
    plain = {}
    for key, tensor in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        plain[key] = tensor.detach().cpu().clone()
    return plain


def export(run_dir: Path, out: Path, checkpoint: str = "best", ema: bool = False) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    state = load_checkpoint(run_dir / f"{checkpoint}.pt")
    weights = state["model"]
    if ema:
        if "ema" not in state:
            raise UserError(f"{run_dir / f'{checkpoint}.pt'}: the run kept no EMA weights (optim.ema_decay=0)")
        weights = state["ema"]["module"]
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: output directory does not exist")
    atomic_torch_save(plain_state_dict(weights), out)
    arch = state.get("config", {}).get("model", {}).get("arch", "?")
    print(f"{out}: {arch} weights of epoch {state['epoch']} ({len(weights)} tensors)")
    return out

