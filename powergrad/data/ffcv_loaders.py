"""ffcv loaders for .beton files (written by ffcv_writer.py), wrapped in ImageBatches.

Pipelines: decode with a crop (RandomResizedCrop for training, centre crop for evaluation),
flip (training), ToTensor, ToTorchImage (channels-last view, no copy), then ToDevice on a GPU.
Normalisation happens in torch on the target device (device_batches.ImageBatches), so the same
code runs on a CPU-only machine and on a GPU box: on CUDA, ToDevice(non_blocking=True) copies
uint8 batches on ffcv's side streams and torch normalises on the GPU; cupy, which ffcv's GPU
NormalizeImage needs, is never used. ffcv's decoders and transforms hold per-Loader state, so
every Loader gets freshly built ones.

Randomness: the sample order comes from seed + epoch (numpy's default_rng, or torch's
DistributedSampler when distributed); ffcv's crop and flip draws use numba's per-thread
generators, which ffcv does not seed, so they differ between runs.
"""
from __future__ import annotations

import numpy as np
import torch

from .beton_meta import BetonInfo
from .device_batches import ImageBatches, TrainImageBatches


def _pipelines(image_decoder, image_ops: list, device: torch.device) -> dict:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    return {
        "image": [image_decoder, *image_ops, ToTensor(), *to_device,
                  ToTorchImage(channels_last=True)],
        "label": [IntDecoder(), ToTensor(), Squeeze(), *to_device],
    }


def _indices(info: BetonInfo, subset: int | None):
    return None if subset is None else np.arange(min(subset, info.num_samples))


class FfcvTrainLoader(TrainImageBatches):
    def __init__(self, info: BetonInfo, cfg, *, batch_size: int, seed: int,
                 device: torch.device, distributed: bool, channels_last: bool):
        from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip

        device = torch.device(device)
        super().__init__(None, cfg=cfg, seed=seed, device=device, channels_last=channels_last,
                         class_names=info.class_names)
        res = self.resolution
        self.decoder = RandomResizedCropRGBImageDecoder((res, res), scale=tuple(cfg.scale),
                                                        ratio=tuple(cfg.ratio))
        flip = [RandomHorizontalFlip(flip_prob=cfg.hflip)] if cfg.hflip > 0 else []
        # QUASI_RANDOM reads less from disk when ffcv pages the file itself (os_cache=False);
        # ffcv has no distributed QUASI_RANDOM, so RANDOM there and with the OS cache.
        quasi = not (distributed or cfg.os_cache)
        self.batches = Loader(
            str(info.path), batch_size=batch_size, num_workers=cfg.workers,
            order=OrderOption.QUASI_RANDOM if quasi else OrderOption.RANDOM, drop_last=True,
            distributed=distributed, seed=seed, os_cache=cfg.os_cache,
            indices=_indices(info, cfg.train_subset),
            pipelines=_pipelines(self.decoder, flip, device))
        self.set_epoch(0)

    def _apply_epoch(self, epoch: int, resolution: int) -> None:
        # ffcv sizes its buffers from the decoder at the start of every epoch.
        self.decoder.output_size = (resolution, resolution)
        self.batches.next_epoch = epoch  # the order is drawn from seed + next_epoch


class FfcvEvalLoader(ImageBatches):
    def __init__(self, info: BetonInfo, cfg, *, batch_size: int, device: torch.device,
                 distributed: bool, channels_last: bool):
        from ffcv.fields.decoders import CenterCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption

        device = torch.device(device)
        res = cfg.val_img_size or cfg.img_size
        decoder = CenterCropRGBImageDecoder((res, res), ratio=cfg.crop_pct)
        loader = Loader(
            str(info.path), batch_size=batch_size, num_workers=cfg.workers,
            order=OrderOption.SEQUENTIAL, drop_last=False, distributed=distributed,
            os_cache=cfg.os_cache, indices=_indices(info, cfg.eval_subset),
            pipelines=_pipelines(decoder, [], device))
        super().__init__(loader, device=device, mean=cfg.mean, std=cfg.std,
                         channels_last=channels_last, class_names=info.class_names)
        self.resolution = res
