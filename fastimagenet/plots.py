"""One picture of a run (run.png in the run directory): loss, accuracy, the LR schedule, the resolution and batch
size per epoch, and the speed. Drawn from metrics.jsonl and config.yaml, at the end of training or on
`fastimagenet plot RUN_DIR`.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.errors import UserError
from fastimagenet.config import from_saved
from fastimagenet.metrics import read_metrics
from fastimagenet.plan import build_plan

# Points per epoch of the LR curve: enough to show warm-up and steps sharply.
_LR_POINTS_PER_EPOCH = 50


def write_run_plot(run_dir: Path) -> Path:
    """Draw run.png (written atomically) and return its path."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not (run_dir / "metrics.jsonl").is_file() or not config_path.is_file():
        raise UserError(f"{run_dir}: not a run directory (needs metrics.jsonl and config.yaml)")
    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{run_dir / 'metrics.jsonl'}: no finished epoch to plot yet")
    cfg = from_saved(config_path)
    plan = build_plan(cfg)
    # A record is written when its epoch ends: plotted at x = epoch + 1 on an axis of epochs trained so far
    # (metrics.jsonl and the console number epochs from 0).
    ends = [r["epoch"] + 1 for r in records]
    # Epochs that runtime.eval_every left unvalidated have no val_* figures: the val curves skip them
    validated = [r for r in records if "val_top1" in r]
    val_ends = [r["epoch"] + 1 for r in validated]
    last_val = validated[-1] if validated else {}

    fig = Figure(figsize=(15, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    fig.suptitle(_title(run_dir, cfg, records), fontsize=13)

    ax = axes[0, 0]
    ax.plot(ends, [r["train_loss"] for r in records], "o-", label="train")
    ax.plot(val_ends, [r["val_loss"] for r in validated], "s-", label="val")
    if "ema_val_loss" in last_val:
        ax.plot(val_ends, [r.get("ema_val_loss") for r in validated], "^--", label="val (EMA)")
    _style(ax, "loss", "cross-entropy")

    ax = axes[0, 1]
    ax.plot(val_ends, [100 * r["val_top1"] for r in validated], "o-", label="top-1")
    ax.plot(val_ends, [100 * r["val_top5"] for r in validated], "s-", label="top-5")
    if "ema_val_top1" in last_val:
        ax.plot(val_ends, [100 * r.get("ema_val_top1", 0) for r in validated], "^--", label="top-1 (EMA)")
    if validated:
        best = max(validated, key=lambda r: r["val_top1"])
        ax.annotate(f"best {best['val_top1']:.1%}", (best["epoch"] + 1, 100 * best["val_top1"]),
                    textcoords="offset points", xytext=(0, -16), ha="center", fontsize=9)
    ax.set_ylim(0, 103)
    _style(ax, "validation accuracy", "%")
    ax.legend(loc="lower right")

    ax = axes[0, 2]
    xs = [i / _LR_POINTS_PER_EPOCH for i in range(cfg.epochs * _LR_POINTS_PER_EPOCH + 1)]
    epoch_of = [min(int(x), cfg.epochs - 1) for x in xs]
    ax.plot(xs, [plan.lr(e, x - e, 1) for x, e in zip(xs, epoch_of)])
    ax.axvline(ends[-1], color="grey", linestyle=":", label="now")
    _style(ax, "learning rate (planned; per step)", "LR")

    ax = axes[1, 0]
    epochs = list(range(cfg.epochs + 1))
    rows = list(plan.rows) + [plan.rows[-1]]  # the step plot's last step ends at the end of the run
    resolutions = [row.resolution for row in rows]
    batches = [row.batch_size for row in rows]
    ax.step(epochs, resolutions, where="post", color="tab:blue", label="resolution")
    ax.set_ylabel("resolution (px)", color="tab:blue")
    twin = ax.twinx()
    twin.step(epochs, batches, where="post", color="tab:orange", linestyle="--", label="batch size")
    twin.set_ylabel("global batch size", color="tab:orange")
    twin.set_ylim(0, max(batches) * 1.15)
    ax.set_ylim(0, max(resolutions) * 1.15)
    ax.axvline(ends[-1], color="grey", linestyle=":")
    _style(ax, "progressive resizing (planned)", None, legend=False)
    ax.legend(handles=ax.get_lines()[:1] + twin.get_lines(), loc="lower right")

    ax = axes[1, 1]
    ax.bar([e - 0.5 for e in ends], [r["images_per_s"] for r in records], width=0.8, color="tab:green",
           label="images/s")
    ax.set_ylabel("images/s (all devices)")
    handles = list(ax.containers)
    if "mfu" in records[-1]:
        twin = ax.twinx()
        handles += twin.plot([e - 0.5 for e in ends], [100 * r.get("mfu", 0) for r in records], "ko-", label="MFU")
        twin.set_ylabel("MFU (%)")
        twin.set_ylim(0, None)
    _style(ax, "throughput per epoch (compile warm-up excluded)", None, legend=False)
    ax.legend(handles=handles, loc="lower right")

    ax = axes[1, 2]
    ax.axis("off")
    ax.text(0.0, 1.0, _summary(records, validated, cfg, plan), va="top", ha="left", family="monospace", fontsize=10,
            transform=ax.transAxes)

    out = run_dir / "run.png"
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return out


def _style(ax, title: str, ylabel: str | None, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel("epochs trained")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()


def _title(run_dir: Path, cfg, records: list[dict]) -> str:
    done = records[-1]["epoch"] + 1
    status = "finished" if done >= cfg.epochs else f"epoch {done} of {cfg.epochs}"
    return f"{run_dir.name}: {cfg.model.arch}, loader {cfg.loader.name}, {status}"


def _summary(records: list[dict], validated: list[dict], cfg, plan) -> str:
    last = records[-1]
    hours = sum(r["epoch_time_s"] for r in records) / 3600
    lines = [
        f"epochs run       {last['epoch'] + 1} / {cfg.epochs}",
        *_val_summary(validated, last),
        f"train time       {hours * 60:.1f} min",
        f"mean images/s    {sum(r['images_per_s'] for r in records) / len(records):,.0f}",
        f"last TFLOP/s     {last['tflops']:.3g}" if "tflops" in last else None,
        f"last MFU         {last['mfu']:.1%}" if "mfu" in last else None,
        f"GPU memory       {last['gpu_mem_gib']:.1f} GiB (peak)" if "gpu_mem_gib" in last else None,
        "",
        f"optimizer        {cfg.optim.name}, lr {cfg.optim.lr} per 256 images",
        f"LR schedule      {cfg.schedule.lr}",
        f"global batch     {_span([row.batch_size for row in plan.rows])}",
        f"resolution       {_span([row.resolution for row in plan.rows])} px",
        f"seed             {cfg.runtime.seed}",
    ]
    return "\n".join(line for line in lines if line is not None)


def _val_summary(validated: list[dict], last: dict) -> list[str]:
    """The last validated epoch's figures (its epoch named when it is not the last epoch run) and the best."""
    if not validated:
        return ["val top-1        not evaluated yet (runtime.eval_every)"]
    last_val, best = validated[-1], max(validated, key=lambda r: r["val_top1"])
    when = "" if last_val is last else f" (epoch {last_val['epoch']})"
    return [
        f"last val top-1   {last_val['val_top1']:.2%}{when}",
        f"last val top-5   {last_val['val_top5']:.2%}{when}",
        f"best val top-1   {best['val_top1']:.2%} (epoch {best['epoch']}, at {best['epoch'] + 1} on the x axes)",
    ]


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)} to {max(values)}"
