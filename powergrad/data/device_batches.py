"""What both image loaders (ffcv and torchvision) share: uint8 batches turned into normalised
float32 batches on the training device, and the train loader's per-epoch state."""
from __future__ import annotations

from collections.abc import Iterable, Sized

import torch

from powergrad.data.resolution_schedule import train_resolution


class ImageBatches:
    """Iterate `batches` of (uint8 images [B, 3, H, W], integer labels [B]) on any device;
    yield float32 images normalised with mean/std (given for pixels in [0, 1]) and int64
    labels, both on `device`.

    Normalising after the copy moves 1 byte per pixel to the GPU instead of 4, and needs
    neither cupy (ffcv's GPU NormalizeImage) nor per-sample work in the CPU workers.
    """

    bad_images = None  # a BadImageTally where the backend can pass over unreadable images

    def __init__(self, batches: Iterable, *, device: torch.device, mean, std,
                 channels_last: bool, class_names: list[str]):
        self.batches = batches
        self.device = torch.device(device)
        self.class_names = list(class_names)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # x_norm = (x / 255 - mean) / std = x * scale + shift, per channel, in float64 first
        mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        self._scale = (1 / (255 * std)).to(torch.float32).to(self.device)
        self._shift = (-mean / std).to(torch.float32).to(self.device)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def skipped_images(self) -> int:
        return self.bad_images.count if self.bad_images is not None else 0

    def __len__(self) -> int:
        assert isinstance(self.batches, Sized)
        return len(self.batches)

    def __iter__(self):
        for images, labels in self.source_batches():
            yield self.to_model_input(images, labels)

    def source_batches(self) -> Iterable:
        """The uint8 batches to convert; a backend may wrap its loader's iteration here."""
        return self.batches

    def to_model_input(self, images: torch.Tensor, labels: torch.Tensor):
        # Both results are new tensors: ffcv reuses its batch buffers for later batches.
        images = images.to(self.device, non_blocking=True)
        images = normalized(images, self._scale, self._shift, self.memory_format)
        labels = labels.to(self.device, non_blocking=True).reshape(-1).to(torch.int64, copy=True)
        return images, labels


def normalized(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
               memory_format: torch.memory_format) -> torch.Tensor:
    """float32 images[:, c] * scale[c] + shift[c] from uint8 [B, C, H, W], as a new tensor in
    `memory_format`: a conversion to float32, then the affine map in place.

    Channels-last memory is [B, H, W, C]: a per-channel (1, C, 1, 1) factor there has an
    innermost run of C = 3 values and does not vectorise (16-20 ms for 64 x 3 x 160 x 160 on
    this machine's CPU, against ~3 ms). So each image row is taken as one vector of W x C
    values, with the C factors tiled W times. (torch.addcmul straight from uint8 would be one
    pass, but mixed dtypes take torch's unvectorised loop: 6x slower here.)
    """
    batch, channels, height, width = images.shape
    if memory_format == torch.channels_last:
        nhwc = images.permute(0, 2, 3, 1).contiguous()  # a view when already channels-last
        rows = nhwc.view(batch * height, width * channels).float()
        rows.mul_(scale.repeat(width)).add_(shift.repeat(width))
        return rows.view(batch, height, width, channels).permute(0, 3, 1, 2)
    per_channel = (1, channels, 1, 1)
    out = images.contiguous().float()
    return out.mul_(scale.view(per_channel)).add_(shift.view(per_channel))


class TrainImageBatches(ImageBatches):
    """Adds set_epoch: the epoch's resolution (progressive resizing) and shuffling seed
    (seed + epoch, so an epoch's order can be replayed, e.g. to skip batches on resume).
    Subclasses apply both to their loader in `_apply_epoch`."""

    def __init__(self, batches: Iterable, *, cfg, seed: int, **kwargs):
        super().__init__(batches, mean=cfg.mean, std=cfg.std, **kwargs)
        from powergrad.data.augment import batch_erasing

        self.batch_augment = batch_erasing(cfg, self.device)
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
