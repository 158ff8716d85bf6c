"""tools/bench_loader.py's data and its loaders, one adapter per loader: each has
prepare(res, workers) and yields (images, labels) batches as the engine iterates them.

  BareFfcv        an ffcv Loader written here (ffcv-imagenet's pipeline), normalised by ffcv's
                  NormalizeImage in its workers, or left uint8;
  Ours            powergrad's FfcvTrainLoader or TorchvisionTrainLoader (uint8: before its
                  normalisation);
  PilTorchvision  ImageFolder decoded by PIL, normalised by the same code as ours;
  Dali            powergrad's DaliTrainLoader, its CPU decode;
  DaliRead        DALI's file reader alone.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch

from powergrad.config.schema import DataConfig
from powergrad.data.beton_meta import read_beton_info
from powergrad.data.device_batches import ImageBatches
from powergrad.data.ffcv_loaders import FfcvTrainLoader
from powergrad.data.ffcv_writer import ImageWriterSettings, write_imagefolder_beton
from powergrad.data.synthetic_images import write_synthetic_image_folder
from powergrad.data.torchvision_loaders import TorchvisionTrainLoader

RESOLUTIONS = (160, 192, 224)  # reached with set_epoch(0, 1, 2) on the ramp below
WORKER_COUNTS = (1, 2)
MEAN, STD = DataConfig.mean, DataConfig.std

# .beton settings: (name, writer settings, what it stands for)
SETTINGS = (
    ("default", ImageWriterSettings(), "writer default = ffcv-imagenet RN-50: 500 px, 50 % JPEG"),
    ("rn18", ImageWriterSettings(max_resolution=400, compress_probability=0.1),
     "ffcv-imagenet RN-18: 400 px, 10 % JPEG"),
    ("jpeg", ImageWriterSettings(write_mode="jpg"), "all JPEG, 500 px"),
)
SETTING_NAMES = tuple(name for name, _, _ in SETTINGS)
TORCHVISION_DECODER = "TorchCodec"  # what TorchvisionTrainLoader decodes with


# --- data -----------------------------------------------------------------------------------

def prepare_data(cache: Path, images: int) -> tuple[Path, dict[str, Path]]:
    folder = cache / f"jpeg_{images}"
    if not (folder / ".complete").exists():
        classes = [f"n{i:08d}" for i in range(10)]
        write_synthetic_image_folder(folder, classes, images // 10, width_range=(300, 500),
                                     height_range=(250, 450), seed=0, quality=90)
        (folder / ".complete").touch()
    betons = {}
    for name, settings, _ in SETTINGS:
        betons[name] = cache / f"{name}_{images}.beton"
        if not betons[name].exists():
            with contextlib.redirect_stderr(io.StringIO()):  # ffcv's writer draws a bar
                write_imagefolder_beton(folder, betons[name], settings=settings, workers=2)
    return folder, betons


def stored_samples(beton: Path) -> tuple[np.memmap, np.ndarray, dict[int, int]]:
    """The file, the image field's per-sample (mode, width, height, data_ptr), ptr -> size."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    return np.memmap(beton, dtype=np.uint8, mode="r"), reader.metadata["f0"], sizes


# --- the variants ---------------------------------------------------------------------------

def ramp_cfg(workers: int) -> DataConfig:
    # epochs 0, 1, 2 train at 160, 192, 224 px (train_resolution's ramp, multiples of 32)
    return DataConfig(dataset="imagefolder", workers=workers, min_res=RESOLUTIONS[0],
                      max_res=RESOLUTIONS[-1], start_ramp=0, end_ramp=len(RESOLUTIONS) - 1)


class BareFfcv:
    """The pipeline ffcv-imagenet writes, on the CPU: decode with a random crop, flip, and
    (optionally) ffcv's NormalizeImage to float32, then torch tensors in channels-last."""

    def __init__(self, beton: Path, batch_size: int, normalize: bool):
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import (NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor,
                                     ToTorchImage)

        self.decoder = RandomResizedCropRGBImageDecoder((RESOLUTIONS[0],) * 2)
        # NormalizeImage must come before ToTensor: placed after ToTorchImage (as on a GPU),
        # ffcv 1.0.2's CPU pipeline compiler loops forever in group_operations.
        norm = [NormalizeImage(np.array(MEAN) * 255, np.array(STD) * 255, np.float32)]
        image = [self.decoder, RandomHorizontalFlip(0.5), *(norm if normalize else []),
                 ToTensor(), ToTorchImage(channels_last=True)]
        self.loader = Loader(str(beton), batch_size=batch_size, num_workers=2,
                             order=OrderOption.RANDOM, drop_last=True, os_cache=True, seed=0,
                             pipelines={"image": image,
                                        "label": [IntDecoder(), ToTensor(), Squeeze()]})

    def prepare(self, res: int, workers: int) -> None:
        self.decoder.output_size = (res, res)
        self.loader.num_workers = workers  # ffcv sets its numba threads from it every epoch

    def __iter__(self):
        return iter(self.loader)


class Ours:
    """powergrad's loader (ffcv or torchvision), iterated as the engine iterates it; with
    uint8=True its batches before normalisation (what it hands a GPU)."""

    def __init__(self, loader, ffcv_loader=None, uint8: bool = False):
        self.loader, self.ffcv_loader, self.uint8 = loader, ffcv_loader, uint8

    def prepare(self, res: int, workers: int) -> None:
        self.loader.set_epoch(RESOLUTIONS.index(res))
        if self.ffcv_loader is not None:
            self.ffcv_loader.num_workers = workers

    def __iter__(self):
        return iter(self.loader.source_batches() if self.uint8 else self.loader)


class PilTorchvision:
    """ImageFolder with its PIL decode and the same v2 augmentation on PIL images, normalised
    by the same ImageBatches code as ours: the torchvision fallback this project shipped
    before torchvision.io (now TorchCodec)."""

    def __init__(self, folder: Path, batch_size: int, workers: int):
        from torch.utils.data import DataLoader, RandomSampler
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import v2 as T

        self.crop = T.RandomResizedCrop(RESOLUTIONS[0])
        dataset = ImageFolder(str(folder), transform=T.Compose(
            [self.crop, T.RandomHorizontalFlip(0.5), T.PILToTensor()]))
        generator = torch.Generator().manual_seed(0)
        batches = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                             sampler=RandomSampler(dataset, generator=generator),
                             drop_last=True, generator=generator)
        self.loader = ImageBatches(batches, device="cpu", mean=MEAN, std=STD,
                                   channels_last=True, class_names=dataset.classes)

    def prepare(self, res: int, workers: int) -> None:
        self.crop.size = (res, res)

    def __iter__(self):
        return iter(self.loader)


class Dali:
    """powergrad's DALI loader over the JPEG folder, as the engine iterates it; threads =
    workers. Here it decodes on the CPU (device="cpu"); on a GPU the same pipeline decodes
    with device="mixed"."""

    def __init__(self, folder: Path, batch_size: int, workers: int):
        from powergrad.data.dali_loaders import DaliTrainLoader
        from powergrad.data.imagefolder_checks import scan_image_folder

        classes, samples = scan_image_folder(folder)
        self.loader = DaliTrainLoader(samples, classes, ramp_cfg(workers), batch_size=batch_size,
                                      seed=0, device="cpu", distributed=False,
                                      channels_last=True)

    def prepare(self, res: int, workers: int) -> None:
        self.loader.set_epoch(RESOLUTIONS.index(res))
        self.loader.threads = workers

    def __iter__(self):
        return iter(self.loader)


class DaliRead:
    """DALI's file reader alone (the encoded bytes and labels, no decode): what stays on the
    CPU per image when the GPU decodes, so its rate bounds the images/s one core can feed."""

    def __init__(self, folder: Path, batch_size: int, workers: int):
        from powergrad.data.imagefolder_checks import scan_image_folder

        _, samples = scan_image_folder(folder)
        self.files, self.labels = [p for p, _ in samples], [y for _, y in samples]
        self.batch_size, self.threads = batch_size, workers

    def prepare(self, res: int, workers: int) -> None:
        self.threads = workers

    def __iter__(self):
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=None,
                      seed=0)
        def read_only():
            jpegs, labels = fn.readers.file(files=self.files, labels=self.labels,
                                            random_shuffle=True, name="reader")
            return jpegs, labels

        pipe = read_only()
        pipe.build()
        count = torch.empty(self.batch_size, 0)  # steady_rate counts images by shape[0]
        for _ in range(len(self.files) // self.batch_size):
            pipe.run()
            yield count, None


def in_cell(key: str, workers: int) -> bool:
    """Whether variant `key` runs in a cell with `workers` workers: the ffcv adapters change
    their worker count per cell, the others are built once per worker count."""
    return not key.startswith(("torchvision", "dali")) or key.endswith(f"w{workers}")


def build_variants(folder: Path, betons: dict[str, Path], batch_size: int) -> dict:
    """{key: adapter}: four ffcv variants per .beton setting, and per worker count the
    torchvision (TorchCodec, PIL) and DALI (whole pipeline, reader alone) variants."""
    b, variants = batch_size, {}
    for name in SETTING_NAMES:
        ours = FfcvTrainLoader(read_beton_info(betons[name]), ramp_cfg(2), batch_size=b,
                               seed=0, device="cpu", distributed=False, channels_last=True)
        variants[f"ffcv ours {name}"] = Ours(ours, ours.batches)
        variants[f"ffcv ours-uint8 {name}"] = Ours(ours, ours.batches, uint8=True)
        variants[f"ffcv bare {name}"] = BareFfcv(betons[name], b, normalize=True)
        variants[f"ffcv uint8 {name}"] = BareFfcv(betons[name], b, normalize=False)
    for workers in WORKER_COUNTS:
        tv = TorchvisionTrainLoader(str(folder), ramp_cfg(workers), batch_size=b, seed=0,
                                    device="cpu", distributed=False, channels_last=True)
        variants[f"torchvision codec w{workers}"] = Ours(tv)
        variants[f"torchvision PIL w{workers}"] = PilTorchvision(folder, b, workers)
        variants[f"dali w{workers}"] = Dali(folder, b, workers)
        variants[f"dali read w{workers}"] = DaliRead(folder, b, workers)
    return variants
