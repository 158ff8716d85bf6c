"""train.sync_bn: BatchNorm statistics over every process's micro-batch instead of each one's
own, timm's --sync-bn. On GPUs this is torch's SyncBatchNorm, converted by timm's helper.

torch's SyncBatchNorm refuses CPU tensors (its kernels are CUDA-only), so on the CPU (gloo: the
tests, and CPU clusters) GlooSyncBatchNorm computes the same statistics with autograd-aware
all-reduces: sums, then centred squares (two passes, so float32 does not lose the variance).
It is not an nn.SyncBatchNorm: DDP refuses those on a CPU module.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
from timm.layers import convert_sync_batchnorm
from torch.nn.modules.batchnorm import _BatchNorm


class GlooSyncBatchNorm(_BatchNorm):
    """SyncBatchNorm's statistics on the CPU (any input of 2 or more dimensions)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        # statistics in at least float32 (bf16 autocast hands bf16 in; the buffers are fp32)
        dtype, x = x.dtype, x.to(torch.promote_types(x.dtype, torch.float32))
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() // x.shape[1]])
        sums = dist_nn.all_reduce(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = dist_nn.all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (self.momentum if self.momentum is not None
                            else 1.0 / float(self.num_batches_tracked))
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), momentum)  # unbiased, as torch
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(dtype)


def convert_to_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of `model` synchronised over the default process group."""
    model = convert_sync_batchnorm(model)
    if device.type != "cuda":
        for module in model.modules():
            if type(module) is nn.SyncBatchNorm:
                module.__class__ = GlooSyncBatchNorm
            elif isinstance(module, nn.SyncBatchNorm):
                raise ValueError(f"train.sync_bn on the CPU handles plain BatchNorm layers, not "
                                 f"{type(module).__name__}; train on GPUs or without sync_bn")
    return model
