"""Data loaders for a recipe's `data:` section, and the contract every loader keeps.

A loader is anything with the attributes and methods of `EvalLoader` (and, for training,
`TrainLoader`): no base class to inherit, so a new backend (DALI, say) satisfies the contract
by having them. `tests/test_data_images.py` checks every loader against both protocols.
"""
from __future__ import annotations

import typing
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import torch

from ..distributed import DistInfo
from ..recipe import DataConfig, DatasetName


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


def _fashion_mnist(data_cfg: DataConfig, **kwargs) -> tuple[TrainLoader, EvalLoader]:
    from .augment import settings_in_use
    from .fashion_mnist import build_fashion_mnist_loaders

    refused = settings_in_use(data_cfg, "fashion_mnist")
    if refused:  # preflight says so first on the command line; this guards the Python API
        raise ValueError(f"{refused[0]} is set, but the Fashion-MNIST loader does not do it")
    return build_fashion_mnist_loaders(data_cfg, **kwargs)


def _image_folder(data_cfg: DataConfig, **kwargs) -> tuple[TrainLoader, EvalLoader]:
    from .images import build_image_loaders
    return build_image_loaders(data_cfg, **kwargs)


# One builder per `data.dataset` value; the modules are imported only when chosen (ffcv and
# torchvision's decoders are not needed for Fashion-MNIST).
BUILDERS: dict[str, Callable[..., tuple[TrainLoader, EvalLoader]]] = {
    "fashion_mnist": _fashion_mnist,
    "imagefolder": _image_folder,
}
assert set(BUILDERS) == set(typing.get_args(DatasetName)), "a dataset without a builder"


def build_loaders(data_cfg: DataConfig, *, batch_size: int, eval_batch_size: int, seed: int,
                  device, dist_info: DistInfo = DistInfo(),
                  channels_last: bool = False) -> tuple[TrainLoader, EvalLoader]:
    """(train loader, eval loader) for data_cfg.dataset; under DDP each process reads its
    share (dist_info.rank of dist_info.world_size)."""
    builder = BUILDERS.get(data_cfg.dataset)
    if builder is None:
        raise ValueError(f"data.dataset: {data_cfg.dataset!r} is not a dataset; expected one "
                         f"of {sorted(BUILDERS)}")
    return builder(data_cfg, batch_size=batch_size, eval_batch_size=eval_batch_size,
                   seed=seed, device=device, dist_info=dist_info, channels_last=channels_last)
