"""The contract every loader keeps: `EvalLoader` and, for training, `TrainLoader`. No base
class to inherit: a new backend (DALI, say) satisfies the contract by having the attributes
and methods; `tests/test_data_images.py` checks every loader against both protocols."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class EvalLoader(Protocol):
    """Yields (float32 images [B, C, H, W], normalised, int64 labels [B]), both already on the
    training device; evaluation loaders yield every sample once, in a fixed order."""

    class_names: list[str]

    @property
    def num_classes(self) -> int: ...

    def __len__(self) -> int: ...  # batches per epoch (per process)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@runtime_checkable
class TrainLoader(EvalLoader, Protocol):
    """An EvalLoader whose order (and augmentation) is drawn from seed + epoch, so an epoch can
    be replayed (resuming skips its first batches), and whose train resolution may change per
    epoch (progressive resizing)."""

    resolution: int  # of the current epoch's images, px

    def set_epoch(self, epoch: int) -> None: ...
