"""ImageNet-style data: pick the ffcv, torchvision or DALI loader for a recipe's `data:` section,
check the data before training starts, and build the train and eval loaders.

The loaders yield (float32 images [B, 3, H, W] normalised with cfg.mean/std, int64 labels
[B]) on the training device and expose len(), num_classes and class_names; the train loader
also has set_epoch(epoch) and `resolution` (see device_batches.py).
"""
from __future__ import annotations

import os
import typing
import warnings

import torch

from powergrad.config.schema import DataConfig, LoaderName
from powergrad.data.augment import settings_in_use
from powergrad.data.contract import EvalLoader, TrainLoader
from powergrad.data.imagefolder_checks import ImageDataError, scan_image_folder, verify_sample
from powergrad.system.distributed import DistInfo

LOADERS = typing.get_args(LoaderName)


def ffcv_import_error() -> str | None:
    """None when ffcv imports, else why not (it is an optional, compiled dependency)."""
    try:
        import ffcv.loader  # noqa: F401
    except Exception as e:  # ImportError, or a broken native build
        return f"{type(e).__name__}: {e}"
    return None


def choose_loader(cfg: DataConfig) -> str:
    """'ffcv', 'torchvision' or 'dali' for cfg.loader, with a clear error when the choice
    cannot work ('auto' never picks DALI: it is chosen by name)."""
    if cfg.loader not in LOADERS:
        raise ValueError(f"data.loader must be one of {LOADERS}, got {cfg.loader!r}")
    betons_set = bool(cfg.train_beton and cfg.val_beton)
    dirs_set = bool(cfg.train_dir and cfg.val_dir)
    if cfg.loader == "ffcv":
        if not betons_set:
            raise ValueError("data.loader is 'ffcv' but data.train_beton and data.val_beton "
                             "are not both set (write them with tools/write_ffcv.py)")
        if (why := ffcv_import_error()) is not None:
            raise ImportError(f"data.loader is 'ffcv' but ffcv does not import ({why}); "
                              "install it from a checkout with `pip install -e '.[ffcv]'` (after `apt-get "
                              "install pkg-config libturbojpeg0-dev libopencv-dev`)")
        return "ffcv"
    if cfg.loader in ("torchvision", "dali"):
        if not dirs_set:
            raise ValueError(f"data.loader is {cfg.loader!r} but data.train_dir and "
                             "data.val_dir are not both set")
        if cfg.loader == "dali":
            from powergrad.data.dali_loaders import DALI_PACKAGE, dali_import_error
            if (why := dali_import_error()) is not None:
                raise ImportError(f"data.loader is 'dali' but NVIDIA DALI does not import "
                                  f"({why}); install it with `pip install {DALI_PACKAGE}` or "
                                  "`pip install -e '.[dali]'`")
        return cfg.loader
    missing = [b for b in (cfg.train_beton, cfg.val_beton) if b and not os.path.isfile(b)]
    if betons_set and missing and dirs_set:
        reason = f"{missing[0]} does not exist"
    elif betons_set:
        why = ffcv_import_error()
        if why is None:
            return "ffcv"
        reason = f"ffcv does not import ({why})"
    else:
        reason = "data.train_beton/val_beton are not set"
    if not dirs_set:
        raise ValueError(f"data.loader is 'auto' but {reason} and data.train_dir/val_dir "
                         "are not both set: nothing to load")
    warnings.warn(f"data.loader auto: using torchvision on {cfg.train_dir} because {reason}",
                  stacklevel=3)
    return "torchvision"


def _scan_checked(root: str, num_classes: int | None) -> tuple[list[str], list[tuple[str, int]]]:
    classes, samples = scan_image_folder(root)
    verify_sample(samples)
    if num_classes is not None and num_classes != len(classes):
        raise ImageDataError(f"{root}: holds {len(classes)} class folders but "
                             f"data.num_classes is {num_classes}")
    return classes, samples


def _check_image_folder(root: str, num_classes: int | None) -> list[str]:
    return _scan_checked(root, num_classes)[0]


def _check_same_classes(train_classes: list[str], val_classes: list[str], train_src: str,
                        val_src: str) -> None:
    if train_classes != val_classes:
        only = sorted(set(train_classes) ^ set(val_classes))[:5]
        raise ImageDataError(f"{val_src}: its {len(val_classes)} classes differ from the "
                             f"{len(train_classes)} of {train_src} (e.g. {only})")


def build_image_loaders(cfg: DataConfig, *, batch_size: int, eval_batch_size: int, seed: int,
                        device: torch.device, dist_info: DistInfo = DistInfo(),
                        channels_last: bool = False) -> tuple[TrainLoader, EvalLoader]:
    """Check the data named by cfg, then build (train loader, eval loader).

    Train: RandomResizedCrop(cfg.scale, cfg.ratio) at the epoch's resolution, horizontal flip
    with probability cfg.hflip, shuffled by seed + epoch, drop_last. Eval: centre crop at ratio
    cfg.crop_pct to cfg.val_img_size (default img_size), in file order, every sample. With
    several processes (dist_info.enabled) each reads its share; the loaders take the rank and
    world size from torch.distributed's process group, which dist_info describes.
    """
    backend = choose_loader(cfg)
    refused = settings_in_use(cfg, backend)
    if refused:  # preflight says so first on the command line; this guards the Python API
        raise ValueError(f"{refused[0]} is set, but the {backend} loader does not do it: "
                         "use data.loader torchvision, or leave it unset")
    common = dict(device=device, distributed=dist_info.enabled, channels_last=channels_last)
    if backend == "ffcv":
        from powergrad.data.beton_meta import read_beton_info
        from powergrad.data.ffcv_loaders import FfcvEvalLoader, FfcvTrainLoader

        train_info = read_beton_info(cfg.train_beton, cfg.num_classes)
        val_info = read_beton_info(cfg.val_beton, cfg.num_classes)
        _check_same_classes(train_info.class_names, val_info.class_names, cfg.train_beton,
                            cfg.val_beton)
        train = FfcvTrainLoader(train_info, cfg, batch_size=batch_size, seed=seed, **common)
        val = FfcvEvalLoader(val_info, cfg, batch_size=eval_batch_size, **common)
    elif backend == "dali":
        from powergrad.data.dali_loaders import DaliEvalLoader, DaliTrainLoader

        train_classes, train_samples = _scan_checked(cfg.train_dir, cfg.num_classes)
        val_classes, val_samples = _scan_checked(cfg.val_dir, cfg.num_classes)
        _check_same_classes(train_classes, val_classes, cfg.train_dir, cfg.val_dir)
        train = DaliTrainLoader(train_samples, train_classes, cfg, batch_size=batch_size,
                                seed=seed, **common)
        val = DaliEvalLoader(val_samples, val_classes, cfg, batch_size=eval_batch_size, **common)
    else:
        from powergrad.data.torchvision_loaders import (TorchvisionEvalLoader,
                                                        TorchvisionTrainLoader)

        train_classes = _check_image_folder(cfg.train_dir, cfg.num_classes)
        val_classes = _check_image_folder(cfg.val_dir, cfg.num_classes)
        _check_same_classes(train_classes, val_classes, cfg.train_dir, cfg.val_dir)
        train = TorchvisionTrainLoader(cfg.train_dir, cfg, batch_size=batch_size, seed=seed,
                                       **common)
        val = TorchvisionEvalLoader(cfg.val_dir, cfg, batch_size=eval_batch_size, **common)
    if len(train) == 0:
        raise ValueError(f"train batch size {batch_size} exceeds the "
                         f"{cfg.train_subset or 'available'} training images: no full batch")
    return train, val
