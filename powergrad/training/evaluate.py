"""Evaluation: test loss, top-1 and top-5 over every rank's share of the evaluation set."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from powergrad.system.distributed import all_reduce_min, all_reduce_sum
from powergrad.system.preemption import Preempted, StopRequest

EVAL_TAGS = ("loss", "top1", "top5")  # logged as eval/<tag> (and eval_ema/<tag>)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype, tta_flip: bool = False,
             max_batches: int | None = None, stop: StopRequest | None = None) -> dict:
    """Test loss, top-1 and top-5 (%) and the images scored, summed over ranks; with tta_flip
    the logits of each image and its mirror image are averaged. max_batches: only the first
    batches (dev runs).

    stop: a training run's StopRequest. A stop signal ends the evaluation before its next
    batch (raises Preempted): an ImageNet evaluation can outlast the grace a scheduler gives
    between its signal and its kill, and a signal in the last epoch's evaluation must not let
    the run finish unsaved or unheard. Under DDP the ranks agree every few batches, only
    among the batches every rank has (the shards differ by a batch at most)."""
    model.eval()
    batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    agreed_within = all_reduce_min(batches, device) if stop is not None else 0
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1, top-5 hits
    seen = 0
    for batch_index, (images, labels) in enumerate(loader):
        if batch_index >= batches:
            break
        if batch_index < agreed_within and stop.should_stop(batch_index, device):
            raise Preempted
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
            if tta_flip:
                logits = (logits + model(images.flip(-1))) / 2
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=-1).sum().double()])
        seen += labels.shape[0]
    loss_sum, top1, top5, seen = all_reduce_sum([*sums.tolist(), float(seen)], device)
    return {"loss": loss_sum / seen, "top1": 100 * top1 / seen, "top5": 100 * top5 / seen,
            "images": int(seen)}
