"""What both image loaders (ffcv and torchvision) share: uint8 batches turned into normalised
float32 batches on the training device, and the train loader's per-epoch state."""
from __future__ import annotations

from collections.abc import Iterable, Sized

import torch

from .resolution_schedule import train_resolution


class ImageBatches:
    """Iterate `batches` of (uint8 images [B, 3, H, W], integer labels [B]) on any device;
    yield float32 images normalised with mean/std (given for pixels in [0, 1]) and int64
    labels, both on `device`.

    Normalising after the copy moves 1 byte per pixel to the GPU instead of 4, and needs
    neither cupy (ffcv's GPU NormalizeImage) nor per-sample work in the CPU workers.
    """

    def __init__(self, batches: Iterable, *, device: torch.device, mean, std,
                 channels_last: bool, class_names: list[str]):
        self.batches = batches
        self.device = torch.device(device)
        self.class_names = list(class_names)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        shape = (1, 3, 1, 1)
        self._mean255 = torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape) * 255
        self._std255 = torch.tensor(std, dtype=torch.float32, device=self.device).view(shape) * 255

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        assert isinstance(self.batches, Sized)
        return len(self.batches)

    def __iter__(self):
        for images, labels in self.batches:
            yield self.to_model_input(images, labels)

    def to_model_input(self, images: torch.Tensor, labels: torch.Tensor):
        # Both results are new tensors: ffcv reuses its batch buffers for later batches.
        images = images.to(self.device, non_blocking=True)
        images = images.contiguous(memory_format=self.memory_format).float()
        images.sub_(self._mean255).div_(self._std255)
        labels = labels.to(self.device, non_blocking=True).reshape(-1).to(torch.int64, copy=True)
        return images, labels


class TrainImageBatches(ImageBatches):
    """Adds set_epoch: the epoch's resolution (progressive resizing) and shuffling seed
    (seed + epoch, so an epoch's order can be replayed, e.g. to skip batches on resume).
    Subclasses apply both to their loader in `_apply_epoch`."""

    def __init__(self, batches: Iterable, *, cfg, seed: int, **kwargs):
        super().__init__(batches, mean=cfg.mean, std=cfg.std, **kwargs)
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        self.resolution = self.resolution_at(0)

    def resolution_at(self, epoch: int) -> int:
        c = self.cfg
        return train_resolution(epoch, c.img_size, c.min_res, c.max_res, c.start_ramp,
                                c.end_ramp)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.resolution = self.resolution_at(epoch)
        self._apply_epoch(epoch, self.resolution)

    def _apply_epoch(self, epoch: int, resolution: int) -> None:
        raise NotImplementedError
