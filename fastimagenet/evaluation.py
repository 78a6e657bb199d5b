"""`evaluate`: a model scored on a val loader, summed over the ranks. The training loop calls it every epoch, and
`fastimagenet eval` (fastimagenet/eval_command.py) on any run, split, resolution or crop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastimagenet.common.errors import UserError
from fastimagenet.distributed import all_reduce_sum
from fastimagenet.runtime import Runtime


@torch.no_grad()
def evaluate(forward, model, loader, rt: Runtime, per_rank_batch: int, tta_flip: bool, num_classes: int = 0) -> dict:
    """Top-1/top-5 and loss over every sample exactly once, summed over the ranks (each evaluates its own disjoint
    shard). The last partial batch is padded to the full per-rank batch (padding labelled -1 and not counted) so
    eval compiles one shape. With `num_classes`, also per-class image counts and top-1 hits (`per_class_*`)."""
    model.eval()
    sums = torch.zeros(4, device=rt.device)  # loss, top1, top5, count
    per_class = torch.zeros(2, max(num_classes, 1), device=rt.device)  # images, top-1 hits
    for images, labels in loader:
        missing = per_rank_batch - labels.shape[0]
        if missing > 0:
            images = torch.cat([images, images[:1].expand(missing, *images.shape[1:])]).contiguous(
                memory_format=torch.channels_last)
            labels = torch.cat([labels, labels.new_full((missing,), -1)])
        rt.step_begin()
        with rt.autocast():
            logits = forward(images)
            if tta_flip:  # a copy: under CUDA graphs the second replay may overwrite the first one's output
                logits = logits.clone() + forward(images.flip(3))
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums += torch.stack([
            F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum"),
            hits[:, 0].sum(),
            hits.any(dim=1).sum(),
            (labels >= 0).sum(),
        ]).float()
        if num_classes:
            real = labels >= 0
            per_class[0] += torch.bincount(labels[real], minlength=num_classes).float()
            per_class[1] += torch.bincount(labels[real & hits[:, 0]], minlength=num_classes).float()
    loss, top1, top5, count = all_reduce_sum(sums).tolist()  # sync: once per evaluation
    if count == 0:
        raise UserError("the validation split produced no samples")
    result = {"val_loss": loss / count, "val_top1": top1 / count, "val_top5": top5 / count, "val_images": int(count)}
    if num_classes:
        images, correct = all_reduce_sum(per_class).tolist()  # sync: once per evaluation
        result.update(per_class_images=[int(v) for v in images], per_class_top1_hits=[int(v) for v in correct])
    return result
