"""What a run reports: metrics.jsonl (one object per epoch), TensorBoard scalars and the console."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.jsonl = (out_dir / "metrics.jsonl").open("a")
        self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log_epoch(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, record["epoch"])
        self.tensorboard.flush()
        print(
            f"epoch {record['epoch']}: res {record['resolution']} bs {record['batch_size']} "
            f"train_loss {record['train_loss']:.4f} val_loss {record['val_loss']:.4f} "
            f"top1 {record['val_top1']:.2%} top5 {record['val_top5']:.2%} "
            f"{record['images_per_s']:.0f} img/s {record['epoch_time_s']:.1f} s"
        )

    def close(self) -> None:
        self.jsonl.close()
        self.tensorboard.close()


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
