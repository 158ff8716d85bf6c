"""Evaluation: test loss, top-1 and top-5 over every rank's share of the evaluation set."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from powergrad.system.distributed import all_reduce_sum

EVAL_TAGS = ("loss", "top1", "top5")  # logged as eval/<tag> (and eval_ema/<tag>)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast on the device in `dtype`; no autocast for None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype, tta_flip: bool = False,
             max_batches: int | None = None) -> dict:
    """Test loss, top-1 and top-5 (%) and the images scored, summed over ranks; with tta_flip
    the logits of each image and its mirror image are averaged. max_batches: only the first
    batches (dev runs)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1, top-5 hits
    seen = 0
    for batch_index, (images, labels) in enumerate(loader):
        if max_batches is not None and batch_index >= max_batches:
            break
        with autocast(device, amp_dtype):
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
