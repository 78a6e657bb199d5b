"""Typed run configuration: defaults -> recipe YAML -> `key=value` overrides.

Every setting lives in one dataclass field, grouped by concern. Unknown keys and values of the wrong type are
errors that name the key and suggest the closest valid one, so a typo never silently trains the wrong thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import subprocess
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from fastimagenet import loaders
from fastimagenet.common.errors import UserError
from fastimagenet.loaders import options as loader_options
from fastimagenet.loaders.options import LoaderConfig
from fastimagenet.models import ARCHS, check_model_options


def _source_and_configs() -> tuple[Path | None, Path]:
    """(the source tree this package runs from, or None when installed; the recipes directory). The recipes are
    configs/ of the source tree; pyproject.toml maps them into the package as `fastimagenet/configs` (package data),
    so a wheel or `pip install .` carries them inside the package. A source tree (a checkout, an editable install
    of one) has no `fastimagenet/configs` and reads configs/ beside the package: always its own recipes, even when
    the checkout on sys.path is not the one an editable install points at."""
    package = Path(str(importlib.resources.files(__package__)))
    if (package / "configs").is_dir():
        return None, package / "configs"
    return package.parent, package.parent / "configs"


SOURCE_TREE, CONFIGS_DIR = _source_and_configs()


class Stage(NamedTuple):
    """One step of explicit progressive resizing: from `epoch` on, train at this resolution and global batch."""

    epoch: int  # the first epoch of the stage
    resolution: int
    batch: int  # global batch size


@dataclass
class DataConfig:
    train: str = ""  # ImageFolder dir (root/<class>/<image>), sharded split or .beton file (local or s3://): per loader
    val: str = ""
    num_classes: int = 0  # 0: inferred from the train split
    strict: bool = False  # unreadable images: error (true) or skip and report (false)
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect ratio
    flip: bool = True
    crop_ratio: float = 224 / 256  # eval: centre crop side / shorter image side
    val_resolution: int = 0  # 0: the last training stage's resolution
    val_batch_size: int = 0  # 0: optim.batch_size


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # resnet18/34/50/101, resnet10_small, resnet18_small (fastimagenet/models.py)
    width: int = 64  # channels of the first stage (small-image archs only)
    zero_init_residual: bool = True  # last BN of each residual block starts at zero
    sync_bn: bool = False  # multi-GPU: BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only)
    blurpool: bool = False  # blur before every strided conv of the stages (anti-aliased downsampling)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.5  # per 256 images; scaled by each stage's batch size
    batch_size: int = 256  # global batch (all ranks together)
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    weight_decay: float = 5e-5  # never applied to norm layers or biases
    label_smoothing: float = 0.1
    grad_clip: float = 0.0  # max global grad norm; 0: off
    accum_steps: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.0  # EMA of the weights, updated per optimizer step and evaluated per epoch; 0: off


@dataclass
class ScheduleConfig:
    lr: str = "linear_ramp"  # step | cosine | onecycle | linear_ramp | plateau (fastimagenet/plateau.py)
    warmup: float = 0.0  # fraction of the run with a linear warm-up from 0
    peak: float = 0.125  # linear_ramp / onecycle: fraction of the run where the LR peaks
    end_lr_ratio: float = 0.0  # final LR / peak LR
    milestones: tuple[float, ...] = (0.33, 0.67)  # step: fractions of the run where LR is multiplied by gamma
    gamma: float = 0.1
    # plateau: the LR (warm-up, then the peak) times plateau_factor after plateau_patience validated epochs whose
    # val top-1 did not beat the best by plateau_threshold (a fraction), down to plateau_min_lr_ratio of the peak
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    plateau_threshold: float = 0.001
    plateau_min_lr_ratio: float = 0.001
    # Progressive resizing, either explicit stages "epoch,resolution,batch;..." (or a YAML list of [epoch,
    # resolution, batch]) or a ramp:
    stages: tuple[Stage, ...] = ()
    min_resolution: int = 160
    max_resolution: int = 192
    ramp_start: float = 0.5  # fraction of the run where the resolution starts to grow
    ramp_end: float = 0.85  # fraction of the run where it reaches max_resolution
    resolution_step: int = 32  # resolutions are multiples of this, which bounds the compiled shapes


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: str = "auto"  # auto (on for CUDA) | true | false
    compile_backend: str = "inductor"
    # default | reduce-overhead (CUDA graphs: one per shape of the plan, replayed; less launch overhead for small
    # per-GPU batches) | max-autotune (also searches kernel configurations: long first compiles, CUDA graphs too)
    compile_mode: str = "default"
    channels_last: bool = True
    tta_flip: bool = False  # evaluate on image + its mirror
    out_dir: str = ""  # "": runs/<arch>-<timestamp>
    seed: int = 0
    log_interval: int = 50  # steps between console/metric reads (each read syncs the device)
    keep_best: int = 1  # checkpoints of the best epochs (by val top-1) kept as best-epochNNN.pt
    eval_every: int = 1  # validate after every Nth epoch (epoch + 1 divisible by N) and after the last one
    peak_tflops: float = 0.0  # one device's peak for MFU; 0: the data-sheet figure of a known GPU at bf16/fp16
    ddp_bucket_mb: int = 25  # DDP gradient bucket size: smaller buckets start all-reduces earlier in backward
    ddp_static_graph: bool = False  # DDP static_graph: the same parameters get gradients every step
    # Stop cleanly (checkpoint, then exit 128 + signal) on SIGTERM, SIGINT and this signal ("": only those two)
    preempt_signal: str = "SIGUSR1"
    preempt_grace_s: float = 30.0  # after the first stop signal, the process is gone within this many seconds
    checkpoint_every_min: float = 0.0  # also write a resumable last.pt inside epochs this often; 0: off, else >= 1


@dataclass
class Config:
    epochs: int = 16
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


CHOICES = {
    "loader.name": loaders.NAMES,
    "model.arch": tuple(ARCHS),
    **loader_options.choices(),
    "optim.name": ("sgd", "adamw"),
    "schedule.lr": ("step", "cosine", "onecycle", "linear_ramp", "plateau"),
    "runtime.device": ("auto", "cpu", "cuda"),
    "runtime.precision": ("auto", "bf16", "fp16", "fp32"),
    "runtime.compile": ("auto", "true", "false"),
    "runtime.compile_mode": ("default", "reduce-overhead", "max-autotune"),
    "runtime.preempt_signal": ("", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT"),
}


# ---------------------------------------------------------------------------------------------- key handling
def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def all_keys(obj=None, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. 'optim.lr'."""
    obj = Config() if obj is None else obj
    keys = []
    for name in _fields(obj):
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def did_you_mean(word: str, options, cutoff: float = 0.6) -> str:
    """' — did you mean 'x'?' for the closest option, or '' when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=cutoff)
    return f" — did you mean '{close[0]}'?" if close else ""


def _unknown_key(key: str, source: str) -> UserError:
    hint = did_you_mean(key, all_keys(), cutoff=0.5)
    if not hint:  # a key without its group (`lr=0.1`): match the last part against each key's last part
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(all_keys())}  # the first key of a shared leaf wins
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
        hint = f" — did you mean '{leaves[close[0]]}'?" if close else ""
    return UserError(f"{source}: unknown config key '{key}'{hint}")


def _is_record(annotation) -> bool:
    """A NamedTuple such as Stage: written "a,b,c" on the command line, [a, b, c] in YAML."""
    return isinstance(annotation, type) and issubclass(annotation, tuple) and hasattr(annotation, "_fields")


def _coerce(value, annotation, key: str, source: str):
    """Turn a YAML/command-line value into the field's declared type, or explain why not."""
    origin = typing.get_origin(annotation)
    if _is_record(annotation):
        bad = UserError(f"{source}: '{key}' entry {value!r} is not {_describe(annotation)} "
                        "(e.g. schedule.stages=\"0,128,512;6,160,384;12,192,256\")")
    else:
        bad = UserError(f"{source}: '{key}' expects {_describe(annotation)}, got {value!r}")
    if origin is tuple or _is_record(annotation):
        item_types = tuple(typing.get_type_hints(annotation).values()) if _is_record(annotation) \
            else typing.get_args(annotation)
        records = _is_record(item_types[0])
        if isinstance(value, str):
            # Lists of records separate records with ';' and their fields with ','
            value = [part for part in value.split(";") if part.strip()] if records \
                else [yaml.safe_load(part) for part in value.split(",")]
        elif isinstance(value, (int, float)) and item_types[-1] is Ellipsis:
            value = [value]  # a one-element list, written without a comma
        if not isinstance(value, (list, tuple)):
            raise bad
        if item_types[-1] is Ellipsis:
            item_types = (item_types[0],) * len(value)
        if len(item_types) != len(value):
            raise bad
        items = tuple(_coerce(v, t, key, source) for v, t in zip(value, item_types))
        return annotation(*items) if _is_record(annotation) else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if annotation is str:
        if isinstance(value, bool):  # YAML reads `compile: true` as a bool
            value = str(value).lower()
        if value is None:
            value = ""
        if not isinstance(value, (str, int, float)):
            raise bad
        value = str(value)
        choices = CHOICES.get(key)
        if choices and value not in choices:
            raise UserError(f"{source}: '{key}' must be one of {', '.join(choices)}, got '{value}'"
                            f"{did_you_mean(value, choices)}")
        return value
    raise AssertionError(f"unhandled config type {annotation}")


def _describe(annotation) -> str:
    if _is_record(annotation):
        return "'" + ",".join(annotation._fields) + "'"
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        if _is_record(item):
            return f"a ';'-separated list of {_describe(item)} (e.g. \"0,128,512;6,160,384\")"
        return "a comma-separated list, each " + _describe(item)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[annotation]


def _hints(obj) -> dict:
    return typing.get_type_hints(type(obj))


def set_key(cfg: Config, key: str, value, source: str) -> None:
    """Set one dotted key, checking that it exists and that the value has the right type."""
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        child = getattr(node, part, None) if part in _fields(node) else None
        if not dataclasses.is_dataclass(child):
            raise _unknown_key(key, source)
        node = child
    name = parts[-1]
    if name not in _fields(node) or dataclasses.is_dataclass(getattr(node, name)):
        raise _unknown_key(key, source)
    setattr(node, name, _coerce(value, _hints(node)[name], key, source))


def _flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + str(key)] = value
    return flat


# ---------------------------------------------------------------------------------------------- recipes
def recipe_files(configs_dir: Path = CONFIGS_DIR) -> list[Path]:
    """The recipe files, sorted; a missing directory is an error rather than an empty list of recipes."""
    if not configs_dir.is_dir():
        raise UserError(f"no recipes: {configs_dir} does not exist (an install without configs/ as package data?)")
    return sorted(configs_dir.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """A recipe is a YAML path or the name of a file in configs/ (without .yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"{path}: recipe file not found")
        return path
    candidate = CONFIGS_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = [p.stem for p in recipe_files()]
    raise UserError(f"unknown recipe '{name_or_path}'{did_you_mean(name_or_path, names)} "
                    f"(recipes: {', '.join(names)})")


def load_config(recipe: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    cfg = Config()
    if recipe:
        path = recipe_path(recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a recipe must be a mapping of config keys")
        # A recipe's one-line purpose and its published reference figure, shown by `fastimagenet recipes`.
        data.pop("description", None)
        data.pop("reference", None)
        for key, value in _flatten(data).items():
            set_key(cfg, key, value, str(path))
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> None:
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"override '{item}': expected key=value, e.g. optim.lr=0.5")
        set_key(cfg, key.strip(), yaml.safe_load(text) if text.strip() else "", "command line")


def validate(cfg: Config) -> None:
    """Reject values that cannot describe a run, naming the key."""
    positive = {
        "epochs": cfg.epochs,
        "optim.batch_size": cfg.optim.batch_size,
        "optim.accum_steps": cfg.optim.accum_steps,
        "schedule.min_resolution": cfg.schedule.min_resolution,
        "schedule.max_resolution": cfg.schedule.max_resolution,
        "schedule.resolution_step": cfg.schedule.resolution_step,
        "model.width": cfg.model.width,
        "runtime.log_interval": cfg.runtime.log_interval,
        "runtime.keep_best": cfg.runtime.keep_best,
        "runtime.eval_every": cfg.runtime.eval_every,
        "runtime.ddp_bucket_mb": cfg.runtime.ddp_bucket_mb,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config: '{key}' must be > 0, got {value}")
    non_negative = {
        "data.num_classes": cfg.data.num_classes,
        "data.val_resolution": cfg.data.val_resolution,
        "data.val_batch_size": cfg.data.val_batch_size,
        "loader.workers": cfg.loader.workers,
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
        "runtime.peak_tflops": cfg.runtime.peak_tflops,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"config: '{key}' must be >= 0, got {value}")
    low, high = cfg.data.scale
    if not 0 < low <= high <= 1:
        raise UserError(f"config: 'data.scale' must satisfy 0 < min <= max <= 1, got {cfg.data.scale}")
    if not 0 < cfg.data.ratio[0] <= cfg.data.ratio[1]:
        raise UserError(f"config: 'data.ratio' must satisfy 0 < min <= max, got {cfg.data.ratio}")
    if not 0 < cfg.data.crop_ratio <= 1:
        raise UserError(f"config: 'data.crop_ratio' must be in (0, 1], got {cfg.data.crop_ratio}")
    if cfg.runtime.preempt_grace_s <= 0:
        raise UserError(f"config: 'runtime.preempt_grace_s' must be > 0, got {cfg.runtime.preempt_grace_s}")
    if cfg.runtime.checkpoint_every_min and cfg.runtime.checkpoint_every_min < 1:
        raise UserError("config: 'runtime.checkpoint_every_min' must be 0 (off) or at least 1, got "
                        f"{cfg.runtime.checkpoint_every_min}")
    if cfg.runtime.compile_mode != "default" and cfg.runtime.compile_backend != "inductor":
        raise UserError(f"config: 'runtime.compile_mode={cfg.runtime.compile_mode}' is a mode of the inductor "
                        f"backend, not of '{cfg.runtime.compile_backend}' (runtime.compile_backend)")
    if not 0 <= cfg.optim.ema_decay < 1:
        raise UserError(f"config: 'optim.ema_decay' must be in [0, 1) (0: off), got {cfg.optim.ema_decay}")
    if cfg.runtime.ddp_static_graph and cfg.optim.accum_steps > 1:
        raise UserError("config: 'runtime.ddp_static_graph=true' cannot be combined with 'optim.accum_steps' > 1 "
                        "(DDP's static graph fails when accumulation micro-steps skip the gradient sync)")
    if not 0 <= cfg.optim.label_smoothing < 1:
        raise UserError(f"config: 'optim.label_smoothing' must be in [0, 1), got {cfg.optim.label_smoothing}")
    if cfg.schedule.min_resolution > cfg.schedule.max_resolution:
        raise UserError("config: 'schedule.min_resolution' must be <= 'schedule.max_resolution'")
    if not 0 <= cfg.schedule.ramp_start <= cfg.schedule.ramp_end <= 1:
        raise UserError("config: need 0 <= 'schedule.ramp_start' <= 'schedule.ramp_end' <= 1")
    for key in ("warmup", "peak", "end_lr_ratio"):
        if not 0 <= getattr(cfg.schedule, key) <= 1:
            raise UserError(f"config: 'schedule.{key}' must be in [0, 1], got {getattr(cfg.schedule, key)}")
    plateau = cfg.schedule
    if not (0 < plateau.plateau_factor < 1 and plateau.plateau_patience >= 1 and plateau.plateau_threshold >= 0
            and 0 < plateau.plateau_min_lr_ratio <= 1):
        raise UserError("config: need 0 < schedule.plateau_factor < 1, schedule.plateau_patience >= 1, "
                        "schedule.plateau_threshold >= 0 and 0 < schedule.plateau_min_lr_ratio <= 1")
    _validate_stages(cfg.schedule.stages, cfg.epochs)
    batches = [cfg.optim.batch_size] + [stage.batch for stage in cfg.schedule.stages]
    if any(batch % cfg.optim.accum_steps for batch in batches):
        raise UserError(f"config: every batch size ({', '.join(map(str, sorted(set(batches))))}) must be divisible "
                        f"by 'optim.accum_steps' ({cfg.optim.accum_steps})")
    check_model_options(cfg.model.arch, cfg.model.width, cfg.model.blurpool)
    loader_options.check(cfg.loader, cfg.data)


def _validate_stages(stages: tuple[Stage, ...], epochs: int) -> None:
    for stage in stages:
        if stage.resolution <= 0 or stage.batch <= 0 or stage.epoch < 0:
            raise UserError(f"config: 'schedule.stages' entry '{','.join(map(str, stage))}': resolution and batch "
                            "must be > 0")
    starts = [stage.epoch for stage in stages]
    if starts and (starts[0] != 0 or starts != sorted(set(starts))):
        raise UserError("config: 'schedule.stages' must start at epoch 0 with increasing start epochs")
    if starts and starts[-1] >= epochs:
        raise UserError(f"config: 'schedule.stages' has a stage at epoch {starts[-1]} but the run has {epochs} epochs "
                        "(explicit stages count epochs and do not scale with 'epochs'; give stages that fit, or "
                        "'schedule.stages=' for the resolution ramp, which is set in fractions of the run)")


# ---------------------------------------------------------------------------------------------- saving
def to_dict(cfg: Config) -> dict:
    def plain(value):
        if isinstance(value, tuple):  # YAML lists, Stage records included
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def git_commit() -> str:
    """The commit of the source tree this package runs from; "unknown" outside git and for an installed wheel (a
    venv inside some other repository must not lend its commit to the run)."""
    if SOURCE_TREE is None:
        return "unknown"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=SOURCE_TREE, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def save_config(cfg: Config, path: Path, resolved: dict | None = None) -> None:
    """The config, plus the commit and seed that make the run reproducible and, under `resolved:`, what the `auto`
    settings became on this machine (device, precision, compile, processes). `from_saved` reads the config part."""
    header = {"git_commit": git_commit(), "seed": cfg.runtime.seed}
    extra = {"resolved": resolved} if resolved else {}
    path.write_text(yaml.safe_dump({"run": header, **extra, **to_dict(cfg)}, sort_keys=False))


def differing_keys(saved: Config, other: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, other value) for every dotted key whose values differ, in the config's key order."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(other))
    return [(key, a[key], b[key]) for key in a if a[key] != b[key]]


def from_saved(path: Path) -> Config:
    """Rebuild the Config a run saved (used by resume and export)."""
    data = yaml.safe_load(path.read_text())
    data.pop("run", None)
    data.pop("resolved", None)
    return from_dict(data, str(path))


def from_dict(data: dict, source: str) -> Config:
    """A Config from the nested mapping `to_dict` made (e.g. the copy a checkpoint carries)."""
    cfg = Config()
    for key, value in _flatten(data).items():
        set_key(cfg, key, value, source)
    return cfg
