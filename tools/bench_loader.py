"""Loader throughput at the .beton settings users write, side by side in one run.

    python tools/bench_loader.py --images 1280 --repeats 3 --out results/bench_loader.md

Data: a synthetic ImageNet-like JPEG folder (~300-500 x 250-450 px, quality 90) cached under
--cache (outside git), written three ways to .beton: the writer's default (longest side 500 px,
50 % of the images JPEG at quality 90, as ffcv-imagenet's ResNet-50 files), ffcv-imagenet's
ResNet-18 files (400 px, 10 % JPEG) and all-JPEG (500 px).

Measured, at 160, 192 and 224 px with 1 and 2 workers, each a pass over the data that yields
normalised float32 channels-last batches on the CPU (what a CPU run trains on):
  ffcv ours       powergrad's FfcvTrainLoader, iterated as the engine iterates it;
  ffcv bare       an ffcv Loader written here, the same decoder/flip pipeline, normalised by
                  ffcv's own NormalizeImage in its worker threads (the reference, within 5 %);
  ffcv uint8      the same bare Loader without normalisation: what the CPU supplies when the
                  GPU normalises (training on a GPU), the ceiling for any CPU-side work;
  ffcv ours-uint8 ours before its normalisation: everything ours does in ffcv;
  torchvision     ImageFolder + the same augmentation, decoded with TorchCodec (what the
                  project ships) and with PIL; both normalised by the same torch code as ours;
  dali            powergrad's DaliTrainLoader on the JPEG folder, its CPU decode here (on a
                  GPU the decode is "mixed": nvJPEG); dali read: DALI's file reader alone,
                  the CPU's floor when the GPU decodes;
  limit           the .beton's stored images decoded (ffcv's own libjpeg-turbo call) or, for
                  raw ones, copied, in `workers` processes: decode of the JPEG share plus a copy
                  of the raw share, with no crop, resize or batching.
Repeats run every variant once per (resolution, workers) cell in a rotating order; ratios are
taken within a repeat and reported as median [min-max]. Each pass skips its first two batches
(ffcv's pipeline start, torchvision's worker start-up) and times the rest.

Also printed: the single-core cost of each stage (where the time goes), the cores per GPU that
the measured rates imply, and the page-cache memory full ImageNet needs, from ffcv's own
scheduling code run on ImageNet's sample count and published file sizes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from powergrad.config.schema import DataConfig
from powergrad.data.beton_meta import read_beton_info
from powergrad.data.device_batches import ImageBatches
from powergrad.data.ffcv_loaders import FfcvTrainLoader
from powergrad.data.ffcv_writer import ImageWriterSettings, write_imagefolder_beton
from powergrad.data.imagenet_archives import IMAGENET
from powergrad.data.synthetic_images import write_synthetic_image_folder
from powergrad.data.torchvision_loaders import TorchvisionTrainLoader

RESOLUTIONS = (160, 192, 224)  # reached with set_epoch(0, 1, 2) on the ramp below
WORKER_COUNTS = (1, 2)
SKIP_BATCHES = 2
MEAN, STD = DataConfig.mean, DataConfig.std

# .beton settings: (name, writer settings, what it stands for)
SETTINGS = (
    ("default", ImageWriterSettings(), "writer default = ffcv-imagenet RN-50: 500 px, 50 % JPEG"),
    ("rn18", ImageWriterSettings(max_resolution=400, compress_probability=0.1),
     "ffcv-imagenet RN-18: 400 px, 10 % JPEG"),
    ("jpeg", ImageWriterSettings(write_mode="jpg"), "all JPEG, 500 px"),
)
JPEG_SHARE = {"default": 0.5, "rn18": 0.1, "jpeg": 1.0}  # nominal; the measured share is used

# Throughput a loader must feed per GPU for ResNet-50. A100: ffcv-imagenet's 88-epoch run,
# 1,281,167 x 88 images in 77.2 min on 8 A100s (its README), ~3,000 img/s per GPU.
A100_RN50 = 3000
# Full ImageNet as ffcv-imagenet's write script stores it (file sizes of public copies named
# train_500_0.50_90.ffcv and train_400_0.10_90.ffcv, huggingface.co/datasets/
# hsgser/imagenet_boomerang_100steps); all-JPEG at 512 px q90: ffcv's docs, 65.47 GB.
IMAGENET_TRAIN = IMAGENET.train_images
PUBLISHED_BYTES = {"default": 543_419_608_424, "rn18": 570_103_770_472, "jpeg": 65.47e9}
PUBLISHED_SOURCE = {"default": "public copy of train_500_0.50_90.ffcv",
                    "rn18": "public copy of train_400_0.10_90.ffcv",
                    "jpeg": "ffcv docs, JPEG q90 at 512 px"}
FFCV_IMAGENET_BATCH = 512  # per GPU, rn50_configs/*.yaml


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


def steady_rate(variant, res: int, workers: int) -> float:
    """Images/s over one pass, from the arrival of batch SKIP_BATCHES - 1 to the last."""
    variant.prepare(res, workers)
    count, start = 0, None
    for i, (images, _) in enumerate(variant):
        if i == SKIP_BATCHES - 1:
            start = time.perf_counter()
        elif i >= SKIP_BATCHES:
            count += images.shape[0]
    if start is None or count == 0:
        raise SystemExit(f"--images too small: fewer than {SKIP_BATCHES + 1} batches a pass")
    return count / (time.perf_counter() - start)


# --- the limit: decode of the JPEG share plus a copy of the raw share -----------------------

_STORED = None


def _open_stored(beton: str) -> None:
    global _STORED
    _STORED = stored_samples(Path(beton))


def _decode_or_copy(indices: list[int]) -> int:
    from ffcv.libffcv import imdecode

    data, fields, sizes = _STORED
    for i in indices:
        mode, width, height, ptr = (int(v) for v in fields[i])
        stored = np.asarray(data[ptr:ptr + sizes[ptr]])
        out = np.empty((height, width, 3), np.uint8)
        if mode == 0:  # ffcv's IMAGE_MODES: 0 = jpg, 1 = raw
            imdecode(stored, out, height, width, height, width, 0, 0, 1, 1, False, False)
        else:
            np.copyto(out.reshape(-1), stored)
    return len(indices)


def limit_rate(beton: Path, workers: int) -> float:
    """Stored images/s: JPEGs decoded at full size, raw pixels copied, `workers` processes."""
    n = len(stored_samples(beton)[1])
    chunks = [list(range(i, min(i + 16, n))) for i in range(0, n, 16)]
    with mp.get_context("fork").Pool(workers, _open_stored, (str(beton),)) as pool:
        pool.map(_decode_or_copy, chunks[:workers])  # start-up outside the timing
        start = time.perf_counter()
        done = sum(pool.map(_decode_or_copy, chunks, chunksize=1))
        return done / (time.perf_counter() - start)


# --- where the time goes, one core ----------------------------------------------------------

def stage_costs(beton: Path, batch_size: int, rounds: int = 5) -> dict:
    """Milliseconds per image of each stage of the ffcv pipeline on one core: JPEG decode, raw
    read, random crop + resize at each resolution (ffcv's own C calls), the hand-off of a batch
    to torch (ToTensor/ToTorchImage are views) and ours normalisation, per image."""
    from ffcv.fields.rgb_image import get_random_crop
    from ffcv.libffcv import imdecode, resize_crop

    data, fields, sizes = stored_samples(beton)
    jpeg = [i for i in range(len(fields)) if fields[i]["mode"] == 0][:64]
    raw = [i for i in range(len(fields)) if fields[i]["mode"] == 1][:64]
    decoded = {}

    def best_of(fn, per) -> float:
        return min(_seconds(fn) for _ in range(rounds)) / per * 1000

    def decode_all():
        for i in jpeg:
            mode, w, h, ptr = (int(v) for v in fields[i])
            out = np.empty((h, w, 3), np.uint8)
            imdecode(np.asarray(data[ptr:ptr + sizes[ptr]]), out, h, w, h, w, 0, 0, 1, 1,
                     False, False)
            decoded[i] = out

    costs = {"jpeg_share": len(jpeg) / max(1, len(jpeg) + len(raw))}
    costs["decode"] = best_of(decode_all, len(jpeg)) if jpeg else 0.0
    for i in raw:
        mode, w, h, ptr = (int(v) for v in fields[i])
        decoded[i] = np.asarray(data[ptr:ptr + sizes[ptr]]).reshape(h, w, 3)  # read in place
    sources = list(decoded.values())
    np.random.seed(0)  # ffcv's crop draws use numpy's global generator
    crops = [get_random_crop(s.shape[0], s.shape[1], (0.08, 1.0), (3 / 4, 4 / 3))
             for s in sources]
    for res in RESOLUTIONS:
        dst = np.empty((res, res, 3), np.uint8)

        def crop_resize():
            for src, (r, c, h, w) in zip(sources, crops):
                resize_crop(src, r, r + h, c, c + w, dst)
        costs[f"resize_{res}"] = best_of(crop_resize, len(sources))
        buffer = np.random.default_rng(1).integers(0, 256, (batch_size, res, res, 3), np.uint8)
        labels = torch.zeros(batch_size, dtype=torch.int32)
        to_torch = lambda: torch.from_numpy(buffer).permute(0, 3, 1, 2)  # noqa: E731
        costs[f"handoff_{res}"] = best_of(to_torch, 1) * 1000  # microseconds per batch
        batches = ImageBatches([], device="cpu", mean=MEAN, std=STD, channels_last=True,
                               class_names=[])
        costs[f"normalise_{res}"] = best_of(
            lambda: batches.to_model_input(to_torch(), labels), batch_size)
    return costs


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- page cache arithmetic for full ImageNet (ffcv's own scheduling code) -------------------

def process_cache_gib(bytes_per_sample: float, batch_size: int, quasi_random: bool,
                      page_size: int = 8 << 20) -> float:
    """GiB one process's ffcv page cache peaks at with os_cache=False over one epoch: the slot
    count of ffcv's compute_schedule for the pages each batch touches, with ImageNet's sample
    count laid out at the mean stored size in ffcv's default 8 MiB pages. A page stays until
    its last sample of the epoch is read, so a RANDOM order keeps almost every page."""
    from ffcv.memory_managers.process_cache.schedule import compute_schedule
    from ffcv.traversal_order.quasi_random import generate_order_inner

    per_page = max(1, int(page_size // bytes_per_sample))
    pages = -(-IMAGENET_TRAIN // per_page)
    page_of = np.arange(IMAGENET_TRAIN) // per_page
    if quasi_random:  # ffcv's QUASI_RANDOM: draws from a window of a few pages at a time
        table = np.full((pages, per_page), -1, np.int64)
        table.reshape(-1)[:IMAGENET_TRAIN] = np.arange(IMAGENET_TRAIN)
        sizes = np.bincount(page_of, minlength=pages).astype(np.int64)
        order = np.zeros(IMAGENET_TRAIN, np.int64)
        generate_order_inner(0, table, sizes, order)
    else:
        order = np.random.default_rng(0).permutation(IMAGENET_TRAIN)
    batches = IMAGENET_TRAIN // batch_size  # drop_last
    order = order[:batches * batch_size].reshape(batches, batch_size)
    slots = compute_schedule([set(page_of[b].tolist()) for b in order]).num_slots
    return slots * page_size / 2**30


# --- the run --------------------------------------------------------------------------------

@dataclass
class Cell:
    res: int
    workers: int


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=1280,
                   help="images in the data set (default 1280)")
    p.add_argument("--batch-size", type=int, default=64, help="(default 64)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--h100-rate", type=float, default=6000,
                   help="ResNet-50 img/s an H100 trains at, for the cores-per-GPU table "
                        "(default 6000: an assumption, see the report)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache/powergrad/bench_loader",
                   help="where the synthetic data is kept "
                        "(default ~/.cache/powergrad/bench_loader)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown report here "
                   "(default: print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the main thread only normalises; more threads fight the workers
    command = "python tools/bench_loader.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    folder, betons = prepare_data(args.cache, args.images)
    print(f"data ready in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)

    b = args.batch_size
    variants = {}
    compile_s = {}
    for name, _, _ in SETTINGS:
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
    for key, variant in variants.items():
        if key.startswith("ffcv") and "ours-uint8" not in key:  # numba compiles on pass 1
            start = time.perf_counter()
            steady_rate(variant, RESOLUTIONS[0], 2)
            compile_s[key] = time.perf_counter() - start
    print(f"ffcv first passes (numba compilation): "
          f"{', '.join(f'{s:.0f}' for s in compile_s.values())} s", flush=True)

    cells = [Cell(res, w) for res in RESOLUTIONS for w in WORKER_COUNTS]
    rates: dict[tuple, list[float]] = {}
    limits: dict[tuple, list[float]] = {}
    for repeat in range(args.repeats):
        for cell in cells:
            keys = [k for k in variants if not k.startswith(("torchvision", "dali"))
                    or k.endswith(f"w{cell.workers}")]
            shift = repeat % len(keys)  # rotate: no variant always runs first
            for key in keys[shift:] + keys[:shift]:
                rate = steady_rate(variants[key], cell.res, cell.workers)
                rates.setdefault((key, cell.res, cell.workers), []).append(rate)
            print(f"repeat {repeat} {cell.res} px w{cell.workers}: " + ", ".join(
                f"{k} {rates[(k, cell.res, cell.workers)][-1]:.0f}" for k in keys), flush=True)
        for name, _, _ in SETTINGS:
            for workers in WORKER_COUNTS:
                limits.setdefault((name, workers), []).append(limit_rate(betons[name], workers))
        print(f"repeat {repeat} limits: " + ", ".join(
            f"{n} w{w} {v[-1]:.0f}" for (n, w), v in limits.items()), flush=True)
    costs = {name: stage_costs(betons[name], b) for name, _, _ in SETTINGS}
    stored = {name: betons[name].stat().st_size / args.images for name, _, _ in SETTINGS}
    memory = {}
    for name, _, _ in SETTINGS:
        per_sample = PUBLISHED_BYTES[name] / IMAGENET_TRAIN
        memory[name] = (process_cache_gib(per_sample, FFCV_IMAGENET_BATCH, quasi_random=True),
                        process_cache_gib(per_sample, FFCV_IMAGENET_BATCH, quasi_random=False))
    report = format_report(args, command, rates, limits, costs, stored, memory, compile_s,
                           time.perf_counter() - t0)
    print(report)
    if args.out:
        args.out.write_text(report)


# --- the report -----------------------------------------------------------------------------

def _median(values) -> float:
    return statistics.median(values)


def _ratio(num: list[float], den: list[float]) -> str:
    """Median [min-max] of per-repeat ratios (side by side within each repeat)."""
    r = [a / b for a, b in zip(num, den)]
    return f"{_median(r):.2f} [{min(r):.2f}-{max(r):.2f}]"


def best_torchvision(rates, res: int, workers: int) -> tuple[str, list[float]]:
    pairs = [(k, rates[(k, res, workers)]) for k in
             (f"torchvision codec w{workers}", f"torchvision PIL w{workers}")]
    return max(pairs, key=lambda kv: _median(kv[1]))


def _cells_at_least(rates, num: str, den: str, bound: float = 0.95) -> dict[int, int]:
    """Per worker count, how many (setting, px) cells have median(num / den) >= bound."""
    hits = {w: 0 for w in WORKER_COUNTS}
    for name, _, _ in SETTINGS:
        for res in RESOLUTIONS:
            for w in WORKER_COUNTS:
                pairs = zip(rates[(f"ffcv {num} {name}", res, w)],
                            rates[(f"ffcv {den} {name}", res, w)])
                hits[w] += _median([a / b for a, b in pairs]) >= bound
    return hits


def verdicts(rates) -> list[str]:
    cells = len(SETTINGS) * len(RESOLUTIONS)
    same_output = _cells_at_least(rates, "ours", "bare")
    uint8 = _cells_at_least(rates, "ours-uint8", "uint8")

    def counts(hits: dict[int, int]) -> str:
        return ", ".join(f"{hits[w]} of {cells} with {w} worker{'s' * (w > 1)}"
                         for w in WORKER_COUNTS)
    return [
        f"**Ours within 5 % of the bare ffcv Loader** (median ratio >= 0.95): same output "
        f"(normalised float32 on this CPU) in {counts(same_output)}; before normalisation "
        f"(uint8, the CPU's work on a GPU machine) in {counts(uint8)}.",
        "",
        "Why ours trails where it does: ours and the bare Loader differ only in where "
        "normalisation runs (the uint8-vs-uint8 count shows the rest of ours matches). "
        "ffcv's NormalizeImage runs inside ffcv's worker threads and writes into buffers ffcv "
        "allocated once; ours runs in the training thread, in torch, and makes a new float32 "
        "batch, because on a GPU that is where it belongs (the GPU does it, the CPU only "
        "queues it). On a CPU-only machine that thread competes with ffcv's workers whenever "
        "the cores are all busy (2 workers on these 2 cores, or other jobs during the run), "
        "and the new 20-39 MB batch is faulted in page by page (on every batch once it is "
        "above glibc's 32 MB mmap threshold, at 224 px). Ours keeps handing out new tensors "
        "because ffcv overwrites its buffers a few batches later: a caller keeping a batch "
        "would see it change.",
    ]


def format_report(args, command, rates, limits, costs, stored, memory, compile_s,
                  total) -> str:
    med = {k: _median(v) for k, v in rates.items()}
    lines = [
        "# Loader throughput at the settings users write",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}. "
        "Machines like this one are noisy (shared hosts, up to 3x apart from day to day): "
        "every variant ran once per (resolution, workers) cell in each repeat, in a rotating "
        "order, and ratios are medians of per-repeat ratios [min-max].",
        f"Data: {args.images} synthetic JPEGs (~300-500 x 250-450 px, quality 90), batch "
        f"{args.batch_size}, RandomResizedCrop(0.08-1, 3/4-4/3) + flip; every variant yields "
        "normalised float32 channels-last batches except `ffcv uint8`, `ffcv ours-uint8` and "
        "`dali read`. Total time "
        f"{total / 60:.1f} min; ffcv's first pass of each Loader (numba compilation) "
        f"{min(compile_s.values()):.0f}-{max(compile_s.values()):.0f} s.",
        "",
        "Settings: " + "; ".join(f"`{n}` = {d} ({stored[n] / 1e3:.0f} kB stored per image "
                                 f"here)" for n, _, d in SETTINGS) + ".",
        "",
        "## ffcv at each setting",
        "",
        "img/s/core = img/s / workers. vs torchvision: over the faster torchvision variant in "
        "the same cell. vs limit: over decode-of-the-JPEG-share + copy-of-the-raw-share in "
        "`workers` processes. vs bare: ours over the bare ffcv Loader with the same output, "
        "normalised by ffcv in its workers (target >= 0.95). uint8 vs uint8: ours before its "
        "normalisation over the bare Loader's uint8 batches (the CPU's work on a GPU machine).",
        "",
        "| setting | px | workers | ours img/s | img/s/core | vs torchvision | vs limit "
        "| vs bare | uint8 vs uint8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    uint8s = ("ours-uint8", "uint8")
    for name, _, _ in SETTINGS:
        for res in RESOLUTIONS:
            for w in WORKER_COUNTS:
                ours = rates[(f"ffcv ours {name}", res, w)]
                _, tv = best_torchvision(rates, res, w)
                lines.append(
                    f"| {name} | {res} | {w} | {_median(ours):.0f} | {_median(ours) / w:.0f} "
                    f"| {_ratio(ours, tv)} | {_ratio(ours, limits[(name, w)])} "
                    f"| {_ratio(ours, rates[(f'ffcv bare {name}', res, w)])} "
                    f"| {_ratio(*(rates[(f'ffcv {v} {name}', res, w)] for v in uint8s))} |")
    lines += [
        "",
        "Limit (img/s, median): " + "; ".join(
            f"{n} w{w} {_median(v):.0f}" for (n, w), v in limits.items()) + ".",
        "",
        *verdicts(rates),
        "",
        "## torchvision: TorchCodec vs PIL decode",
        "",
        "| px | workers | TorchCodec img/s | PIL img/s | codec / PIL |",
        "|---|---|---|---|---|",
    ]
    io_ahead = 0
    for res in RESOLUTIONS:
        for w in WORKER_COUNTS:
            tio = rates[(f"torchvision codec w{w}", res, w)]
            pil = rates[(f"torchvision PIL w{w}", res, w)]
            io_ahead += _median([a / b for a, b in zip(tio, pil)]) > 1
            lines.append(f"| {res} | {w} | {_median(tio):.0f} | {_median(pil):.0f} "
                         f"| {_ratio(tio, pil)} |")
    cells = len(RESOLUTIONS) * len(WORKER_COUNTS)
    lines += ["", f"TorchCodec ahead of PIL in {io_ahead} of {cells} cells; the project's "
              "torchvision loader decodes with TorchCodec."]
    lines += [
        "",
        "## DALI on the original JPEGs",
        "",
        "The paper's own input pipeline (its official code): DALI reads the JPEG folder and "
        "decodes, crops, resizes, flips and normalises. Here the decode runs on the CPU; on a "
        "GPU it is `mixed` (nvJPEG; A100/H100 add a hardware JPEG decoder), and what stays on "
        "the CPU is reading the files (`dali read`: the reader alone) plus the host side of "
        "nvJPEG (parsing; for the hybrid backend also the Huffman decode of small images), "
        "which this machine cannot measure. Cores per GPU below are therefore a floor: GPU "
        "rate / (`dali read` img/s per core).",
        "",
        "| px | workers | dali img/s | img/s/core | vs TorchCodec | vs ffcv ours, jpeg "
        "| dali read img/s/core | cores per A100, floor | cores per H100, floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in RESOLUTIONS:
        for w in WORKER_COUNTS:
            dali = rates[(f"dali w{w}", res, w)]
            read = _median(rates[(f"dali read w{w}", res, w)]) / w
            lines.append(
                f"| {res} | {w} | {_median(dali):.0f} | {_median(dali) / w:.0f} "
                f"| {_ratio(dali, rates[(f'torchvision codec w{w}', res, w)])} "
                f"| {_ratio(dali, rates[(f'ffcv ours jpeg', res, w)])} | {read:.0f} "
                f"| {A100_RN50 / read:.2f} | {args.h100_rate / read:.2f} |")
    lines += [
        "",
        "## Where the time goes (one core, ms per image)",
        "",
        "Stages timed alone on one core (best of 5). In ffcv's worker threads: the JPEG decode "
        "(ffcv's libjpeg-turbo call, weighed by the JPEG share; raw images are read in place, "
        "not copied) and the random crop + resize (ffcv's OpenCV call). `measured` is "
        "1 / (ours-uint8 img/s with 1 worker): the workers' share, timed in the pipeline. In "
        "the training thread: ours normalisation (a new float32 batch; on the GPU when "
        "training there) and the hand-off to torch (ToTensor/ToTorchImage make views: "
        "microseconds per batch, not per image).",
        "",
        "| setting | px | decode x share | crop+resize | workers' sum | measured (1 worker) "
        "| normalise | hand-off, us/batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _, _ in SETTINGS:
        c = costs[name]
        for res in RESOLUTIONS:
            dec = c["decode"] * c["jpeg_share"]
            measured = 1000 / med[(f"ffcv ours-uint8 {name}", res, 1)]
            lines.append(f"| {name} | {res} | {dec:.2f} | {c[f'resize_{res}']:.2f} | "
                         f"{dec + c[f'resize_{res}']:.2f} | {measured:.2f} | "
                         f"{c[f'normalise_{res}']:.3f} | {c[f'handoff_{res}']:.0f} |")
    lines += [
        "",
        "## Cores per GPU (arithmetic)",
        "",
        "On a GPU the CPU's share of ours is the uint8 pipeline (ffcv's ToDevice copies the "
        "batch, the GPU normalises): the `ffcv uint8` rate with 2 workers / 2 cores is the "
        "per-core rate used; ours with its normalisation on this CPU is shown beside it. "
        f"Cores = GPU rate / per-core rate. A100: {A100_RN50} img/s (ffcv-imagenet's "
        f"ResNet-50); H100: {args.h100_rate:.0f} img/s, an assumption (`--h100-rate`; no "
        "published ffcv-imagenet H100 number) that `tools/gpu_saturation.py` replaces with a "
        "measurement on the machine. ffcv-imagenet trains mostly at 160 px, the last epochs "
        "at 192.",
        "",
        "| setting | px | img/s/core, GPU path | cores per A100 | cores per H100 "
        "| img/s/core, ours on this CPU |",
        "|---|---|---|---|---|---|",
    ]
    for name, _, _ in SETTINGS:
        for res in RESOLUTIONS:
            per_core = med[(f"ffcv uint8 {name}", res, 2)] / 2
            lines.append(f"| {name} | {res} | {per_core:.0f} | {A100_RN50 / per_core:.1f} "
                         f"| {args.h100_rate / per_core:.1f} "
                         f"| {med[(f'ffcv ours {name}', res, 2)] / 2:.0f} |")
    worst = max(A100_RN50 / (med[("ffcv uint8 default", res, 2)] / 2) for res in (160, 192))
    lines += [
        "",
        f"Goal, at most 8 cores per A100 at the default setting (160-192 px): "
        f"{'met' if worst <= 8 else 'NOT met'} ({worst:.1f} at most here). These are "
        "synthetic images of ~400 x 350 px on average; most ImageNet photos are 500 px on "
        "the long side, so decode and resize cost more per image there.",
        "",
        "## Page-cache memory for full ImageNet (1,281,167 training images)",
        "",
        "os_cache=True (the default, ffcv-imagenet's in_memory=1) keeps the whole file in the "
        "page cache, shared by every process on the node. os_cache=False lets each process "
        "page the file itself; the GiB below is the slot count of ffcv's own compute_schedule "
        f"x 8 MiB pages for batch {FFCV_IMAGENET_BATCH}, QUASI_RANDOM (one process per node "
        "only: ffcv has no distributed QUASI_RANDOM) and RANDOM (what a DDP run gets).",
        "",
        "| setting | file size (source) | per sample | os_cache=True, per node | "
        "QUASI_RANDOM, per process | RANDOM, per process |",
        "|---|---|---|---|---|---|",
    ]
    for name, _, _ in SETTINGS:
        size = PUBLISHED_BYTES[name]
        quasi, rand = memory[name]
        lines.append(f"| {name} | {size / 1e9:.0f} GB ({PUBLISHED_SOURCE[name]}) | "
                     f"{size / IMAGENET_TRAIN / 1e3:.0f} kB | {size / 2**30:.0f} GiB | "
                     f"{quasi:.1f} GiB | {rand:.1f} GiB |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
