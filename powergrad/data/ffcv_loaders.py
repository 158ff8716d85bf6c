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

Threads: ffcv sets torch's thread count to its worker count, for the whole process, when a
Loader is built and again when each epoch starts (its Compiler.set_num_threads), so the
training thread's torch work would run on as many threads as ffcv's workers, on the cores
they already fill (and a recipe's train.threads would be lost). Both loaders put the caller's
count back, after construction and once each epoch's first batch has arrived (by then ffcv's
epoch thread has made its call).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from powergrad.data.beton_meta import BetonInfo
from powergrad.data.contract import eval_shard
from powergrad.data.device_batches import ImageBatches, TrainImageBatches
from powergrad.system.distributed import world_from_env


def _pipelines(image_decoder, image_ops: list, device: torch.device) -> dict:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    return {
        "image": [image_decoder, *image_ops, ToTensor(), *to_device,
                  ToTorchImage(channels_last=True)],
        "label": [IntDecoder(), ToTensor(), Squeeze(), *to_device],
    }


def memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_private_page_caches(info: BetonInfo, processes_here: int) -> None:
    """With os_cache=False each process pages the file itself, and under DDP ffcv reads in
    RANDOM order (it has no distributed QUASI_RANDOM): a page stays until its last sample of
    the epoch is read, so each process ends up holding nearly the whole file (ffcv's own
    schedule, results/bench_loader.md). Refuse before training when that cannot fit."""
    need = info.path.stat().st_size * processes_here
    if need > memory_bytes():
        raise ValueError(
            f"{info.path}: data.os_cache is false under DDP, so each of the {processes_here} "
            f"processes on this machine would cache nearly the whole file: {need / 1e9:.0f} GB "
            f"> {memory_bytes() / 1e9:.0f} GB of memory; set data.os_cache: true (the page "
            "cache then holds the file once for every process)")


def _indices(info: BetonInfo, subset: int | None):
    return None if subset is None else np.arange(min(subset, info.num_samples))


def keeping_torch_threads(batches, threads: int):
    """Iterate an ffcv Loader, restoring torch's thread count after its epoch thread set it."""
    for i, batch in enumerate(batches):
        if i == 0:
            torch.set_num_threads(threads)
        yield batch


class FfcvTrainLoader(TrainImageBatches):
    def __init__(self, info: BetonInfo, cfg, *, batch_size: int, seed: int,
                 device: torch.device, distributed: bool, channels_last: bool):
        from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip

        device = torch.device(device)
        if distributed and not cfg.os_cache:  # the launcher says how many share a node
            check_private_page_caches(info, world_from_env().local_world_size)
        super().__init__(None, cfg=cfg, seed=seed, device=device, channels_last=channels_last,
                         class_names=info.class_names)
        res = self.resolution
        self.decoder = RandomResizedCropRGBImageDecoder((res, res), scale=tuple(cfg.scale),
                                                        ratio=tuple(cfg.ratio))
        flip = [RandomHorizontalFlip(flip_prob=cfg.hflip)] if cfg.hflip > 0 else []
        self.torch_threads = torch.get_num_threads()
        # QUASI_RANDOM reads less from disk when ffcv pages the file itself (os_cache=False);
        # ffcv has no distributed QUASI_RANDOM, so RANDOM there and with the OS cache.
        quasi = not (distributed or cfg.os_cache)
        self.batches = Loader(
            str(info.path), batch_size=batch_size, num_workers=cfg.workers,
            order=OrderOption.QUASI_RANDOM if quasi else OrderOption.RANDOM, drop_last=True,
            distributed=distributed, seed=seed, os_cache=cfg.os_cache,
            indices=_indices(info, cfg.train_subset),
            pipelines=_pipelines(self.decoder, flip, device))
        torch.set_num_threads(self.torch_threads)
        self.set_epoch(0)

    def source_batches(self):
        return keeping_torch_threads(self.batches, self.torch_threads)

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
        self.torch_threads = torch.get_num_threads()
        indices = _indices(info, cfg.eval_subset)
        if indices is None:
            indices = np.arange(info.num_samples)
        if distributed:
            # Each rank reads its own shard as a one-process Loader: ffcv's distributed
            # order pads ranks to equal length with repeated samples (DistributedSampler).
            indices = indices[eval_shard(len(indices), torch.distributed.get_rank(),
                                         torch.distributed.get_world_size())]
        loader = Loader(
            str(info.path), batch_size=batch_size, num_workers=cfg.workers,
            order=OrderOption.SEQUENTIAL, drop_last=False, distributed=False,
            os_cache=cfg.os_cache, indices=indices, pipelines=_pipelines(decoder, [], device))
        torch.set_num_threads(self.torch_threads)
        super().__init__(loader, device=device, mean=cfg.mean, std=cfg.std,
                         channels_last=channels_last, class_names=info.class_names)
        self.resolution = res

    def source_batches(self):
        return keeping_torch_threads(self.batches, self.torch_threads)
