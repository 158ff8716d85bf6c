"""Throughput of the ffcv train loader vs torchvision's DataLoader (same augmentation, same
worker count) and the bare JPEG-decode rate of the same files on the same cores.

    python tools/bench_loader.py --images 2500 --workers 2 --out results/bench_loader.md

Data: a synthetic ImageNet-like JPEG folder (sizes ~300-500 x 250-450 px, quality 90) cached
under --cache (default ~/.cache/powergrad/bench_loader, outside git), and a .beton of it
written with write_mode='jpg' so ffcv decodes a JPEG for every image, like torchvision and the
bare decode (ffcv-imagenet's files store half the images as raw pixels, which is faster).

Measured: uint8 batches out of each loader (what the CPU must supply; normalisation runs on
the GPU in training). Repeats alternate ffcv and torchvision so a neighbour's load on the CPU
hits both alike; the ratio reported is the median of the per-repeat ratios.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from PIL import Image  # noqa: E402

from powergrad.data.beton_meta import read_beton_info  # noqa: E402
from powergrad.recipe import DataConfig  # noqa: E402
from powergrad.data.ffcv_loaders import FfcvTrainLoader  # noqa: E402
from powergrad.data.ffcv_writer import ImageWriterSettings, write_imagefolder_beton  # noqa: E402
from powergrad.data.synthetic_images import write_synthetic_image_folder  # noqa: E402
from powergrad.data.torchvision_loaders import TorchvisionTrainLoader  # noqa: E402

RESOLUTIONS = (160, 192)
A100_RN50_IMAGES_PER_S = 3000  # ffcv-imagenet's ResNet-50 rate per A100


def prepare_data(cache: Path, images: int, workers: int) -> tuple[Path, Path]:
    folder, beton = cache / f"jpeg_{images}", cache / f"jpeg_{images}.beton"
    if not (folder / ".complete").exists():
        classes = [f"n{i:08d}" for i in range(10)]
        write_synthetic_image_folder(folder, classes, images // 10, width_range=(300, 500),
                                     height_range=(250, 450), seed=0, quality=90)
        (folder / ".complete").touch()
    if not beton.exists():
        write_imagefolder_beton(folder, beton, workers=workers,
                                settings=ImageWriterSettings(write_mode="jpg"))
    return folder, beton


def _decode(path: str) -> int:
    with Image.open(path) as img:
        img.load()
        return img.size[0]


def bare_decode_rate(folder: Path, workers: int) -> float:
    """PIL (libjpeg-turbo) full decodes of every file in `workers` processes, images/s."""
    paths = sorted(str(p) for p in folder.rglob("*.JPEG"))
    with mp.Pool(workers) as pool:
        pool.map(_decode, paths[:workers * 4])  # start-up outside the timing
        start = time.perf_counter()
        pool.map(_decode, paths, chunksize=32)
        return len(paths) / (time.perf_counter() - start)


def timed_epoch(loader, epoch: int) -> tuple[float, int]:
    loader.set_epoch(epoch)
    start, count = time.perf_counter(), 0
    for images, _ in loader.batches:  # raw uint8 batches, before device normalisation
        count += images.shape[0]
    return time.perf_counter() - start, count


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache/powergrad/bench_loader")
    p.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    args = p.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder, beton = prepare_data(args.cache, args.images, args.workers)
    print(f"data ready in {time.perf_counter() - t0:.0f} s: {folder}, {beton}")

    # Epoch e < 1 runs at 160, e >= 1 at 192 (progressive-resizing schedule, one Loader each).
    cfg = DataConfig(dataset="imagefolder", workers=args.workers, min_res=RESOLUTIONS[0],
                     max_res=RESOLUTIONS[1], start_ramp=0, end_ramp=1)
    common = dict(batch_size=args.batch_size, seed=0, device="cpu", distributed=False,
                  channels_last=False)
    ffcv = FfcvTrainLoader(read_beton_info(beton), cfg, **common)
    tv = TorchvisionTrainLoader(str(folder), cfg, **common)
    first_s, first_n = timed_epoch(ffcv, 0)  # includes numba compilation
    print(f"ffcv first epoch (compile + run): {first_s:.1f} s for {first_n} images")

    rates = {(name, res): [] for name in ("ffcv", "torchvision") for res in RESOLUTIONS}
    ratios = {res: [] for res in RESOLUTIONS}
    decode = []
    for repeat in range(args.repeats):
        for epoch, res in enumerate(RESOLUTIONS):
            run = {}
            for name, loader in (("ffcv", ffcv), ("torchvision", tv)):
                seconds, count = timed_epoch(loader, epoch)
                run[name] = count / seconds
                rates[(name, res)].append(run[name])
            ratios[res].append(run["ffcv"] / run["torchvision"])
            print(f"repeat {repeat} res {res}: ffcv {run['ffcv']:.0f}/s, "
                  f"torchvision {run['torchvision']:.0f}/s")
        decode.append(bare_decode_rate(folder, args.workers))
        print(f"repeat {repeat} bare decode {decode[-1]:.0f}/s")
    total = time.perf_counter() - t0
    report = format_report(args, rates, ratios, statistics.median(decode), first_s, first_n,
                           total)
    print(report)
    if args.out:
        args.out.write_text(report)


def format_report(args, rates, ratios, decode, first_s, first_n, total) -> str:
    cores = args.workers
    med = {k: statistics.median(v) for k, v in rates.items()}
    lines = [
        "# Loader throughput: ffcv vs torchvision",
        "",
        f"Command: `python tools/bench_loader.py --images {args.images} --workers "
        f"{args.workers} --batch-size {args.batch_size} --repeats {args.repeats}"
        + (f" --out {args.out}`" if args.out else "`"),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"{cores} loader workers; {platform.platform()}; CPU possibly shared with another "
        "job (repeats interleaved, medians).",
        f"Data: {args.images} synthetic JPEGs, ~300-500 x 250-450 px, quality 90; .beton "
        "written with write_mode='jpg'. Batch size "
        f"{args.batch_size}; RandomResizedCrop(0.08-1, 3/4-4/3) + flip 0.5; uint8 output.",
        "",
        "| output | ffcv img/s | torchvision img/s | ffcv / torchvision (median of ratios) "
        "| ffcv img/s per core | ffcv / bare decode |",
        "|---|---|---|---|---|---|",
    ]
    for res in RESOLUTIONS:
        f, t = med[("ffcv", res)], med[("torchvision", res)]
        lines.append(f"| {res} px | {f:.0f} | {t:.0f} | {statistics.median(ratios[res]):.2f}x "
                     f"| {f / cores:.0f} | {f / decode:.0%} |")
    per_core = med[("ffcv", RESOLUTIONS[0])] / cores
    lines += [
        "",
        f"Bare JPEG decode (PIL/libjpeg-turbo, full size, {cores} processes): {decode:.0f} "
        f"img/s ({decode / cores:.0f} per core).",
        f"ffcv first epoch, including numba compilation: {first_s:.1f} s for {first_n} images "
        f"(steady state at {RESOLUTIONS[0]} px: {first_n / med[('ffcv', RESOLUTIONS[0])]:.1f} s).",
        "",
        f"Cores per GPU: ResNet-50 trains at ~{A100_RN50_IMAGES_PER_S} img/s per A100 "
        f"(ffcv-imagenet); at {per_core:.0f} img/s per core ({RESOLUTIONS[0]} px) that needs "
        f"{A100_RN50_IMAGES_PER_S / per_core:.1f} cores per GPU with ffcv and "
        f"{A100_RN50_IMAGES_PER_S / (med[('torchvision', RESOLUTIONS[0])] / cores):.1f} with "
        "torchvision.",
        "",
        "Targets (issue #4): ffcv >= 2.5x torchvision in steady state: "
        + ", ".join(f"{res} px {'met' if statistics.median(ratios[res]) >= 2.5 else 'NOT met'}"
                    for res in RESOLUTIONS)
        + "; ffcv >= 80 % of bare decode: "
        + ", ".join(f"{res} px {'met' if med[('ffcv', res)] >= 0.8 * decode else 'NOT met'}"
                    for res in RESOLUTIONS) + ".",
        f"Total benchmark time: {total:.0f} s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
