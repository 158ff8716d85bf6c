"""The contract every loader keeps: `EvalLoader` and, for training, `TrainLoader`. No base
class to inherit: each backend (Fashion-MNIST, torchvision, FFCV, DALI) satisfies the contract
by having the attributes and methods; `tests/test_data_images.py` checks every loader against
both protocols.
`eval_shard` is the one split of an evaluation set between ranks that they all use."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class EvalLoader(Protocol):
    """Yields (float32 images [B, C, H, W], normalised, int64 labels [B]), both already on the
    training device; evaluation loaders yield every sample once, in a fixed order (under DDP
    each rank yields its `eval_shard`, so every sample once over all ranks)."""

    class_names: list[str]

    @property
    def num_classes(self) -> int: ...

    @property
    def skipped_images(self) -> int: ...  # unreadable ones passed over so far (data.bad_images)

    def __len__(self) -> int: ...  # batches per epoch (per process)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@runtime_checkable
class TrainLoader(EvalLoader, Protocol):
    """An EvalLoader whose order (and augmentation) is drawn from seed + epoch, so an epoch can
    be replayed (resuming skips its first batches), and whose train resolution may change per
    epoch (progressive resizing)."""

    resolution: int  # of the current epoch's images, px
    # applied by the training step to each normalised batch it trains on (not to batches
    # replayed on resume): random erasing (data.reprob), else None
    batch_augment: Callable[[torch.Tensor], torch.Tensor] | None

    def set_epoch(self, epoch: int) -> None: ...


def eval_shard(count: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s share of `count` evaluation samples: the contiguous block
    [floor(rank N / n), floor((rank + 1) N / n)), DALI's reader's own shard rule. Shards may
    differ by one sample and are not padded to equal length (torch's DistributedSampler and
    ffcv's distributed order repeat samples to do that, and the repeats would be scored
    twice); evaluation sums its counts over ranks, so uneven shards need nothing more."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)
