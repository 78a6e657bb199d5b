"""What a run reports: metrics.jsonl (one object per epoch), TensorBoard scalars and the console."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from fastimagenet.common.atomic import atomic_output


@dataclass
class EpochResult:
    """What one training epoch measured, summed over the ranks."""

    loss: float  # mean training loss over the steps
    images_per_s: float  # all ranks together, leaving out the first steps (compile warm-up, loader start-up)
    seconds: float


class RunLogger:
    def __init__(self, out_dir: Path, start_epoch: int = 0):
        """`start_epoch` > 0 resumes a run: records of epochs from `start_epoch` on (logged before a crash, after
        the checkpoint being resumed) are dropped, so every epoch appears once."""
        self.out_dir = out_dir
        path = out_dir / "metrics.jsonl"
        if start_epoch > 0 and path.exists():
            kept = [json.dumps(r) + "\n" for r in read_metrics(out_dir) if r["epoch"] < start_epoch]
            with atomic_output(path) as tmp:
                tmp.write_text("".join(kept))
        self.jsonl = path.open("a")
        self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start_epoch or None)

    def log_epoch(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, record["epoch"])
        self.tensorboard.flush()
        val = (f"val_loss {record['val_loss']:.4f} top1 {record['val_top1']:.2%} top5 {record['val_top5']:.2%}"
               if "val_loss" in record else "val: not evaluated (runtime.eval_every)")
        print(
            f"epoch {record['epoch']}: res {record['resolution']} bs {record['batch_size']} "
            f"train_loss {record['train_loss']:.4f} {val} "
            f"{record['images_per_s']:.0f} img/s {record['epoch_time_s']:.1f} s"
            + (f" MFU {record['mfu']:.1%}" if "mfu" in record else "")
            + (f" GPU mem {record['gpu_mem_gib']:.1f} GiB" if "gpu_mem_gib" in record else "")
        )

    def close(self) -> None:
        self.jsonl.close()
        self.tensorboard.close()


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
