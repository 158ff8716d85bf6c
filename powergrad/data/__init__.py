"""Data loaders for a recipe's `data:` section. Every loader yields (images, labels) already
on the training device; train loaders also have set_epoch(epoch), num_classes, resolution."""
from __future__ import annotations

from ..recipe import DataConfig


def build_loaders(cfg: DataConfig, *, batch_size: int, eval_batch_size: int, seed: int,
                  device, dist_info, channels_last: bool = False):
    if cfg.dataset == "fashion_mnist":
        from .fashion_mnist import build_fashion_mnist_loaders
        return build_fashion_mnist_loaders(
            cfg, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
            device=device, rank=dist_info.rank, world_size=dist_info.world_size,
            channels_last=channels_last)
    from .images import build_image_loaders
    return build_image_loaders(cfg, batch_size=batch_size, eval_batch_size=eval_batch_size,
                               seed=seed, device=device, distributed=dist_info.enabled,
                               channels_last=channels_last)
