"""Validation: top-1/top-5 and loss over every val sample once, summed over the ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fatscale.data.loader import ValLoader


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: ValLoader, device: torch.device, precision: str,
             confusion: torch.Tensor | None = None) -> dict[str, float]:
    """top-1/top-5 (percent) and mean loss, with the number of images evaluated and of those left
    out as undecodable (quarantined). ``confusion``, a (classes, classes) int64 tensor on ``device``
    (fatscale.evaluate's per-class figures), gets the count of each (label, top-1 prediction) pair
    added, summed over the ranks."""
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, top1, top5, count, quarantined
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    for images, labels in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals[0] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        totals[1] += (top5[:, 0] == labels).sum()
        totals[2] += (top5 == labels[:, None]).any(1).sum()
        totals[3] += labels.numel()
        if confusion is not None:
            classes = confusion.shape[0]
            confusion += torch.bincount(labels * classes + top5[:, 0], minlength=classes * classes).view_as(confusion)
    totals[4] = len(loader.quarantine)
    dist.all_reduce(totals)
    if confusion is not None:
        dist.all_reduce(confusion)
    loss_sum, top1, top5, count, quarantined = totals.tolist()
    return dict(loss=loss_sum / count, top1=100 * top1 / count, top5=100 * top5 / count, count=count,
                quarantined=quarantined)
