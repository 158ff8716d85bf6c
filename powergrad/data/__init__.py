"""Data loaders for a recipe's `data:` section: `build_loaders` picks the data set's builder;
every loader keeps the contract in contract.py (EvalLoader, TrainLoader)."""
from __future__ import annotations

import typing
from collections.abc import Callable

from powergrad.config.schema import DataConfig, DatasetName
from powergrad.data.contract import EvalLoader, TrainLoader
from powergrad.system.distributed import DistInfo


def _fashion_mnist(data_cfg: DataConfig, **kwargs) -> tuple[TrainLoader, EvalLoader]:
    from powergrad.data.augment import settings_in_use
    from powergrad.data.fashion_mnist import build_fashion_mnist_loaders

    refused = settings_in_use(data_cfg, "fashion_mnist")
    if refused:  # preflight says so first on the command line; this guards the Python API
        raise ValueError(f"{refused[0]} is set, but the Fashion-MNIST loader does not do it")
    return build_fashion_mnist_loaders(data_cfg, **kwargs)


def _image_folder(data_cfg: DataConfig, **kwargs) -> tuple[TrainLoader, EvalLoader]:
    from powergrad.data.images import build_image_loaders
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
