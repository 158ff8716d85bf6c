"""torchvision loaders for ImageFolder trees (the fallback when ffcv or .beton files are
missing), with the same augmentation as the ffcv loaders, wrapped in ImageBatches.

Workers decode with TorchCodec (libjpeg-turbo, straight to a uint8 tensor: what torchvision.io
did, with the same pixels, before torchvision 0.29 deprecated its decoders for it) and crop and
resize tensors: 1.3-1.4x the images/s of ImageFolder's PIL decode with the same transforms
(results/bench_loader.md, with torchvision.io; TorchCodec 1.24-1.45x in
results/bench_loader_torchcodec.md). Formats TorchCodec does not read (BMP, TIFF, PPM/PGM) go
through PIL, and so does everything where TorchCodec is not installed. Normalisation happens on
the target device (device_batches.ImageBatches). Workers are not persistent, so each epoch's
workers see that epoch's crop size. Evaluation resizes the shorter
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
from torchvision.transforms import v2 as T

from powergrad.data.augment import INTERPOLATIONS, colour_transforms, repeated_sampler
from powergrad.data.contract import eval_shard
from powergrad.data.device_batches import ImageBatches, TrainImageBatches
from powergrad.data.imagefolder_checks import ImageDataError
from powergrad.system.preemption import end_workers_at_exit, ignore_in_worker

# What TorchCodec decodes here (CMYK and greyscale JPEGs come out as RGB, as with PIL).
TORCHCODEC_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _torchcodec_decoder():
    """TorchCodec's decode_image, or None where it is not installed (a GPU node's bare
    environment: gpu-check runs there without the extras): PIL then decodes everything."""
    try:
        from torchcodec.decoders import decode_image
    except ImportError:
        return None
    return decode_image


_DECODE = _torchcodec_decoder()


def read_rgb(path: str) -> torch.Tensor:
    """uint8 [3, H, W] RGB pixels of the image file at `path`."""
    if _DECODE is not None and path.lower().endswith(TORCHCODEC_SUFFIXES):
        image = _DECODE(path, mode="RGB")
        return image[0] if image.dim() == 4 else image  # an animated WebP: its first frame
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


_MAX_BAD_IN_A_ROW = 16  # then the folder itself is suspect, not a few files in it


class ScreenedImageFolder(ImageFolder):
    """ImageFolder whose samples are (image, label, bad): an image that does not decode is
    not raised in a worker process (a traceback from another process, hours in) but named in
    `bad` ('' when all was well, else one line per unreadable file), and the folder's next
    readable image stands in for it, as timm's ImageDataset does. The main process then
    stops or counts (BadImageTally)."""

    def __getitem__(self, index: int):
        bad = []
        for offset in range(min(len(self.samples), _MAX_BAD_IN_A_ROW)):
            i = (index + offset) % len(self.samples)
            try:
                image, label = super().__getitem__(i)
            except (RuntimeError, OSError, ValueError) as err:  # TorchCodec's and PIL's
                bad.append(f"{self.samples[i][0]}: unreadable image ({type(err).__name__}: "
                           f"{' '.join(str(err).split())})")
                continue
            return image, label, "\n".join(bad)
        raise ImageDataError(f"{self.root}: {len(bad)} unreadable images in a row, the first "
                             f"{bad[0]}; run `powergrad check-data {self.root}`")


class BadImageTally:
    """What the main process does with the unreadable images a batch reports: `error` raises
    ImageDataError naming the first, `skip` counts them (`count`, over the loader's life)."""

    def __init__(self, policy: str, root: str):
        self.policy, self.root, self.count = policy, root, 0

    def screen(self, batches):
        for images, labels, bad in batches:
            lines = [line for entry in bad if entry for line in entry.split("\n")]
            if lines and self.policy == "error":
                raise ImageDataError(f"{lines[0]}; `powergrad check-data {self.root}` lists "
                                     "every bad file, data.bad_images=skip trains past them")
            self.count += len(lines)
            yield images, labels


def _subset(dataset, n: int | None):
    return dataset if n is None else Subset(dataset, range(min(n, len(dataset))))


class TorchvisionTrainLoader(TrainImageBatches):
    def __init__(self, root: str, cfg, *, batch_size: int, seed: int, device: torch.device,
                 distributed: bool, channels_last: bool):
        device = torch.device(device)
        super().__init__(None, cfg=cfg, seed=seed, device=device, channels_last=channels_last,
                         class_names=[])
        res = self.resolution
        self.crop = T.RandomResizedCrop(res, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                        interpolation=INTERPOLATIONS[cfg.train_interpolation])
        dataset = ScreenedImageFolder(root, loader=read_rgb, transform=T.Compose(
            [self.crop, T.RandomHorizontalFlip(cfg.hflip), *colour_transforms(cfg, res)]))
        self.bad_images = BadImageTally(cfg.bad_images, root)
        self.class_names = dataset.classes
        dataset = _subset(dataset, cfg.train_subset)
        self.generator = torch.Generator()
        world, rank = ((torch.distributed.get_world_size(), torch.distributed.get_rank())
                       if distributed else (1, 0))
        if cfg.aug_repeats:
            self.sampler = repeated_sampler(dataset, cfg.aug_repeats, world, rank)
        elif distributed:
            self.sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        else:
            self.sampler = RandomSampler(dataset, generator=self.generator)
        # The generator also seeds the workers, so augmentations replay with the order.
        end_workers_at_exit()  # they ignore SIGTERM, which is how Python's exit ends them
        self.batches = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                  num_workers=cfg.workers, drop_last=True,
                                  generator=self.generator, pin_memory=device.type == "cuda",
                                  worker_init_fn=ignore_in_worker)
        self.set_epoch(0)

    def source_batches(self):
        return self.bad_images.screen(self.batches)

    def _apply_epoch(self, epoch: int, resolution: int) -> None:
        self.crop.size = (resolution, resolution)
        self.generator.manual_seed(self.seed + epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)  # its order is drawn from seed + epoch
        elif hasattr(self.sampler, "set_epoch"):  # RepeatAugSampler draws from its epoch alone
            self.sampler.set_epoch(self.seed + epoch)


class TorchvisionEvalLoader(ImageBatches):
    def __init__(self, root: str, cfg, *, batch_size: int, device: torch.device,
                 distributed: bool, channels_last: bool):
        device = torch.device(device)
        res = cfg.val_img_size or cfg.img_size
        dataset = ScreenedImageFolder(root, loader=read_rgb, transform=T.Compose(
            [T.Resize(math.floor(res / cfg.crop_pct)), T.CenterCrop(res)]))
        self.bad_images = BadImageTally(cfg.bad_images, root)
        class_names = dataset.classes
        dataset = _subset(dataset, cfg.eval_subset)
        if distributed:  # not DistributedSampler: it pads ranks with repeated images
            shard = eval_shard(len(dataset), torch.distributed.get_rank(),
                               torch.distributed.get_world_size())
            dataset = Subset(dataset, shard)
        end_workers_at_exit()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                            num_workers=cfg.workers, pin_memory=device.type == "cuda",
                            worker_init_fn=ignore_in_worker)
        super().__init__(loader, device=device, mean=cfg.mean, std=cfg.std,
                         channels_last=channels_last, class_names=class_names)
        self.resolution = res

    def source_batches(self):
        return self.bad_images.screen(self.batches)
