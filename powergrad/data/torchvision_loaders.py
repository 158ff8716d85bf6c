"""torchvision loaders for ImageFolder trees (the fallback when ffcv or .beton files are
missing), with the same augmentation as the ffcv loaders, wrapped in ImageBatches.

Workers decode with torchvision.io (libjpeg-turbo, straight to a uint8 tensor) and crop and
resize tensors: 1.3-1.4x the images/s of ImageFolder's PIL decode with the same transforms
(results/bench_loader.md). Formats torchvision.io cannot read (BMP, TIFF, PPM/PGM) go through
PIL. Normalisation happens on the target device (device_batches.ImageBatches). Workers are not
persistent, so each epoch's workers see that epoch's crop size. Evaluation resizes the shorter
side to res / crop_pct and crops the centre (timm's and torchvision's convention); ffcv crops
first and then resizes, an equivalent crop up to rounding.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2 as T

from ..preemption import ignore_in_worker
from .device_batches import ImageBatches, TrainImageBatches


# What torchvision.io decodes (CMYK and greyscale JPEGs come out as RGB, as with PIL).
TORCHVISION_IO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def read_rgb(path: str) -> torch.Tensor:
    """uint8 [3, H, W] RGB pixels of the image file at `path`."""
    if path.lower().endswith(TORCHVISION_IO_SUFFIXES):
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


def _subset(dataset, n: int | None):
    return dataset if n is None else Subset(dataset, range(min(n, len(dataset))))


class TorchvisionTrainLoader(TrainImageBatches):
    def __init__(self, root: str, cfg, *, batch_size: int, seed: int, device: torch.device,
                 distributed: bool, channels_last: bool):
        device = torch.device(device)
        super().__init__(None, cfg=cfg, seed=seed, device=device, channels_last=channels_last,
                         class_names=[])
        res = self.resolution
        self.crop = T.RandomResizedCrop(res, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio))
        dataset = ImageFolder(root, loader=read_rgb, transform=T.Compose(
            [self.crop, T.RandomHorizontalFlip(cfg.hflip)]))
        self.class_names = dataset.classes
        dataset = _subset(dataset, cfg.train_subset)
        self.generator = torch.Generator()
        if distributed:  # rank and world size from torch.distributed
            self.sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        else:
            self.sampler = RandomSampler(dataset, generator=self.generator)
        # The generator also seeds the workers, so augmentations replay with the order.
        self.batches = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                  num_workers=cfg.workers, drop_last=True,
                                  generator=self.generator, pin_memory=device.type == "cuda",
                                  worker_init_fn=ignore_in_worker)
        self.set_epoch(0)

    def _apply_epoch(self, epoch: int, resolution: int) -> None:
        self.crop.size = (resolution, resolution)
        self.generator.manual_seed(self.seed + epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)  # its order is drawn from seed + epoch


class TorchvisionEvalLoader(ImageBatches):
    def __init__(self, root: str, cfg, *, batch_size: int, device: torch.device,
                 distributed: bool, channels_last: bool):
        device = torch.device(device)
        res = cfg.val_img_size or cfg.img_size
        dataset = ImageFolder(root, loader=read_rgb, transform=T.Compose(
            [T.Resize(math.floor(res / cfg.crop_pct)), T.CenterCrop(res)]))
        class_names = dataset.classes
        dataset = _subset(dataset, cfg.eval_subset)
        sampler = DistributedSampler(dataset, shuffle=False) if distributed else None
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                            num_workers=cfg.workers, pin_memory=device.type == "cuda",
                            worker_init_fn=ignore_in_worker)
        super().__init__(loader, device=device, mean=cfg.mean, std=cfg.std,
                         channels_last=channels_last, class_names=class_names)
        self.resolution = res
