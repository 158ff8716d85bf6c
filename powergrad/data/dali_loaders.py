"""NVIDIA DALI loaders for ImageFolder trees of JPEGs: the input pipeline of the PGT paper's own
runs, which trained from the original ImageNet JPEGs through DALI (its official code).

Train: fn.readers.file over the epoch's file list (this rank's shard), a random-resized-crop
decode (fn.decoders.image_random_crop with data.scale / data.ratio: only the crop window is
decoded where the format allows), a resize to the epoch's resolution (antialiased,
data.train_interpolation's filter), a flip with probability data.hflip and normalisation with
data.mean / data.std (fn.crop_mirror_normalize). With data.aa (timm's RandAugment,
dali_augment.py) the flip comes first (fn.flip) and RandAugment after it, timm's order. Random
erasing (data.reprob) acts on the normalised batch, as for every image loader. Eval: decode,
resize the shorter side to res / crop_pct, centre crop res, normalise. Both emit float32 HWC
batches, which torch sees as channels_last NCHW.

On a CUDA device the JPEGs decode with device="mixed" (nvJPEG, and the hardware JPEG decoder
of A100/H100) and everything after the decode runs on that GPU; on a CPU the same pipeline
runs with device="cpu" and device_id=None.

Order and randomness: a fresh pipeline per pass, so set_epoch needs nothing rebuilt by hand.
The epoch's order is numpy's default_rng(seed + epoch).permutation over all training files,
cut to a multiple of the world size (every rank takes the same number of steps) and split into
contiguous shards, one per rank; with data.aug_repeats it is timm's RepeatAugSampler at epoch
seed + epoch, as the torchvision loader draws it (each image `repeats` times in a row, the
copies spread over the ranks). The crops, flips and RandAugment draws come from the pipeline
seed, drawn from (seed, epoch, rank), so ranks draw differently and an epoch replays. On the
CPU a replay is bit-for-bit (tests/test_dali_loader.py); on a GPU the order, crop windows and
flips replay, while the pixels of a GPU decode are not promised identical to a CPU decode's.
DALI's order and crops are its own: the same seed gives ffcv, torchvision and DALI the same
data in different orders and crops.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from powergrad.data.augment import repeated_sampler
from powergrad.data.contract import eval_shard
from powergrad.data.dali_augment import fill_value, rand_augment, rand_augment_spec
from powergrad.data.device_batches import ImageBatches, TrainImageBatches

DALI_PACKAGE = "nvidia-dali-cuda130"  # the CUDA 13 build; its CPU pipelines need no GPU


def dali_import_error() -> str | None:
    """None when DALI's pipeline API and its PyTorch plugin import, else why not."""
    try:
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return f"{type(e).__name__}: {e}"
    return None


def _shard() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, (0, 1) outside a process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _DaliPass:
    """What every pipeline shares: the device placement and the batch conversion to torch."""

    def _dali_setup(self, device: torch.device, batch_size: int, threads: int, mean, std):
        self.on_gpu = device.type == "cuda"
        self.device_id = (device.index if device.index is not None
                          else torch.cuda.current_device()) if self.on_gpu else None
        self.decode_device = "mixed" if self.on_gpu else "cpu"
        self.batch_size = batch_size
        self.threads = max(1, threads)
        self.mean255 = [m * 255 for m in mean]  # DALI normalises 0-255 pixels
        self.std255 = [s * 255 for s in std]

    def _run(self, pipeline, drop_last: bool):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
        batches = DALIGenericIterator(pipeline, ["images", "labels"], reader_name="reader",
                                      last_batch_policy=policy, auto_reset=False)
        try:
            for (batch,) in batches:
                if batch["labels"].shape[0] == 0:
                    # DALI gives every shard the largest shard's batch count: a shard one
                    # image smaller can end with an empty batch
                    continue
                images = batch["images"].permute(0, 3, 1, 2)  # NHWC memory: channels_last
                images = images.contiguous(memory_format=self.memory_format)
                # A synchronous copy into a tensor of our own: the labels are a CPU output in
                # memory DALI owns (its dynamic executor hands it over through DLPack) and
                # reuses once this batch's tensor is dropped, which an asynchronous copy that
                # nothing waits on could still be reading.
                labels = batch["labels"].to(self.device, torch.int64, copy=True)
                yield images, labels.reshape(-1)
        finally:
            del batches, pipeline  # free the pipeline's threads and buffers now


class DaliTrainLoader(_DaliPass, TrainImageBatches):
    def __init__(self, samples: list[tuple[str, int]], class_names: list[str], cfg, *,
                 batch_size: int, seed: int, device: torch.device, distributed: bool,
                 channels_last: bool):
        device = torch.device(device)
        super().__init__(None, cfg=cfg, seed=seed, device=device, channels_last=channels_last,
                         class_names=class_names)
        self._dali_setup(device, batch_size, cfg.workers, cfg.mean, cfg.std)
        self.samples = samples[:cfg.train_subset] if cfg.train_subset else samples
        self.rank, self.world_size = _shard() if distributed else (0, 1)
        self.rand_augment = rand_augment_spec(cfg.aa) if cfg.aa else None
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self._rank_order()) // self.batch_size

    def _apply_epoch(self, epoch: int, resolution: int) -> None:
        pass  # each pass builds its pipeline from self.epoch and self.resolution

    def pipeline_seed(self) -> int:
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)
        return int(state[0] & 0x7FFFFFFF)

    def _rank_order(self) -> list[int]:
        """This rank's sample indices for the epoch, in order."""
        if self.cfg.aug_repeats:
            sampler = repeated_sampler(range(len(self.samples)), self.cfg.aug_repeats,
                                       self.world_size, self.rank)
            sampler.set_epoch(self.seed + self.epoch)  # the torchvision loader's epoch seed
            return list(sampler)
        order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.samples))
        share = len(order) // self.world_size
        return order[self.rank * share:(self.rank + 1) * share].tolist()

    def __iter__(self):
        order = self._rank_order()
        files = [self.samples[i][0] for i in order]
        labels = [self.samples[i][1] for i in order]
        yield from self._run(self._pipeline(files, labels), drop_last=True)

    def _pipeline(self, files: list[str], labels: list[int]):
        from nvidia.dali import fn, pipeline_def, types

        cfg, res = self.cfg, self.resolution

        interpolation = {"bilinear": types.INTERP_LINEAR,
                         "bicubic": types.INTERP_CUBIC}[cfg.train_interpolation]
        spec = self.rand_augment

        # conditionals only for RandAugment: its per-sample choice of op splits the batch
        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=self.device_id, seed=self.pipeline_seed(),
                      enable_conditionals=spec is not None)
        def train_pipeline():
            # the order is this rank's already (_rank_order): the reader reads it whole
            jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                           name="reader")
            images = fn.decoders.image_random_crop(
                jpegs, device=self.decode_device, output_type=types.RGB,
                random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio))
            images = fn.resize(images, resize_x=res, resize_y=res, interp_type=interpolation,
                               antialias=True)
            mirror = fn.random.coin_flip(probability=cfg.hflip)
            if spec is not None:  # a Python test at build time: timm flips, then augments
                images = fn.flip(images, horizontal=mirror)
                images = rand_augment(images, spec, size=res, fill=fill_value(cfg.mean))
                mirror = 0
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="HWC", mean=self.mean255,
                std=self.std255, mirror=mirror)
            return images, label

        return train_pipeline()


class DaliEvalLoader(_DaliPass, ImageBatches):
    def __init__(self, samples: list[tuple[str, int]], class_names: list[str], cfg, *,
                 batch_size: int, device: torch.device, distributed: bool,
                 channels_last: bool):
        device = torch.device(device)
        super().__init__(None, device=device, mean=cfg.mean, std=cfg.std,
                         channels_last=channels_last, class_names=class_names)
        self._dali_setup(device, batch_size, cfg.workers, cfg.mean, cfg.std)
        self.samples = samples[:cfg.eval_subset] if cfg.eval_subset else samples
        self.resolution = cfg.val_img_size or cfg.img_size
        self.resize_to = math.floor(self.resolution / cfg.crop_pct)
        # Every file once over all ranks: DALI's reader shards as eval_shard does (uneven
        # shards, no padding), and the iterator's PARTIAL policy ends each rank's last batch
        # at its shard's end, dropping what the reader read past it to fill the batch.
        self.rank, self.world_size = _shard() if distributed else (0, 1)

    def __len__(self) -> int:
        shard = eval_shard(len(self.samples), self.rank, self.world_size)
        return math.ceil(len(shard) / self.batch_size)

    def __iter__(self):
        yield from self._run(self._pipeline(), drop_last=False)

    def _pipeline(self):
        from nvidia.dali import fn, pipeline_def, types

        files, labels = [p for p, _ in self.samples], [y for _, y in self.samples]
        res = self.resolution

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=self.device_id, seed=0)
        def eval_pipeline():
            jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=self.rank,
                                           num_shards=self.world_size, random_shuffle=False,
                                           pad_last_batch=False, name="reader")
            images = fn.decoders.image(jpegs, device=self.decode_device, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=self.resize_to,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="HWC", crop=(res, res),
                mean=self.mean255, std=self.std255)
            return images, label

        return eval_pipeline()
