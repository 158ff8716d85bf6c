"""The DeiT training pipeline on the torchvision loader and on DALI's CPU pipeline, side by side
in one run: images/s and cores per GPU at 224 px.

    python tools/bench_deit_loaders.py --images 200 --rounds 3 --write results/bench_deit_loaders.md

The pipeline is recipes/imagenet/deit_small_base.yaml's data section: a bicubic random-resized
crop to 224 px, flip 0.5, RandAugment rand-m9-mstd0.5-inc1 (timm's on PIL images in the
torchvision loader's worker processes; DALI's auto_aug ops in DALI's CPU threads,
powergrad/data/dali_augment.py) and repeated augmentation x3, yielding normalised float32
channels-last batches on the CPU. Random erasing is left out of both: it acts on the normalised
batch on the training device (the GPU, in a GPU run) and costs the CPU nothing there.

Data: synthetic ImageNet-like JPEGs (300-500 x 250-450 px, quality 90: tools/bench_loader.py's
images). Each case is one pass over them, timed from the arrival of its second batch to its
last (worker start-up and DALI's pipeline build left out); the cases are run once per round in
a rotating order (bench_timing.side_by_side), and DALI / torchvision ratios are
taken within a round. Cores per GPU = a GPU's training rate / img/s per core; the GPU rates
are round numbers to read the table by, not measurements. Writes a JSON record and renders the
markdown from it (tools/bench_record.py); --render redraws the markdown without measuring.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_record import add_output_arguments, new_record, run
from bench_timing import Spread, side_by_side

from powergrad.commands.arguments import whole_number
from powergrad.config.loading import load_recipe
from powergrad.data.dali_loaders import DaliTrainLoader
from powergrad.data.imagefolder_checks import scan_image_folder
from powergrad.data.synthetic_images import write_synthetic_image_folder
from powergrad.data.torchvision_loaders import TorchvisionTrainLoader

TOOL, TOOL_PATH = "bench_deit_loaders", "tools/bench_deit_loaders.py"
RECIPE = Path(__file__).resolve().parent.parent / "recipes/imagenet/deit_small_base.yaml"
GPU_RATES = (1000, 2000, 4000)  # img/s a GPU might train DeiT-S at: to read the table by
LOADERS = ("torchvision", "dali")


def deit_data(loader: str, folder: Path, workers: int):
    # torchvision trains past the images timm's RandAugment fails on (Pillow 13 refuses
    # PosterizeIncreasing's 0 bits at magnitude 10), as data.bad_images=skip would
    skip = ["data.bad_images=skip"] if loader == "torchvision" else []
    data = load_recipe(RECIPE, [f"data.loader={loader}", f"data.train_dir={folder}",
                                f"data.val_dir={folder}", f"data.workers={workers}",
                                "data.reprob=0", "data.min_res=null",
                                "data.max_res=null"] + skip).data
    assert data.img_size == 224 and data.aa and data.aug_repeats, "not DeiT's data section"
    return data


def build(loader: str, folder: Path, workers: int, batch_size: int):
    data = deit_data(loader, folder, workers)
    common = dict(batch_size=batch_size, seed=0, device=torch.device("cpu"), distributed=False,
                  channels_last=True)
    if loader == "dali":
        classes, samples = scan_image_folder(folder)
        return DaliTrainLoader(samples, classes, data, **common)
    return TorchvisionTrainLoader(str(folder), data, **common)


def steady_rate(train, epoch: int) -> float:
    """Images/s over one pass, from the arrival of its second batch to its last."""
    train.set_epoch(epoch)  # a new order (and for DALI a new pipeline) each pass
    count, start = 0, None
    for i, (images, _) in enumerate(train):
        if i == 1:
            start = time.perf_counter()
        elif i > 1:
            count += images.shape[0]
    if start is None or count == 0:
        raise SystemExit("--images too small: fewer than 3 batches a pass")
    return count / (time.perf_counter() - start)


def measure(args, command: str) -> dict:
    torch.set_num_threads(1)  # the main thread only normalises and collates
    record = new_record(TOOL, command, {"images": args.images, "rounds": args.rounds,
                                        "batch_size": args.batch_size, "workers": args.workers,
                                        "px": 224, "gpu_rates": list(GPU_RATES)}, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        classes = [f"n{i:08d}" for i in range(10)]
        written = write_synthetic_image_folder(tmp, classes, args.images // 10, seed=0,
                                               width_range=(300, 500), quality=90,
                                               height_range=(250, 450))
        record["params"]["images"] = len(written)
        loaders = {(name, w): build(name, Path(tmp), w, args.batch_size)
                   for w in args.workers for name in LOADERS}
        passes = {key: 0 for key in loaders}

        def case(key):
            def one_pass():
                passes[key] += 1
                return steady_rate(loaders[key], passes[key])
            return one_pass
        rates = side_by_side({f"{name} w{w}": case((name, w)) for name, w in loaders},
                             args.rounds, after_round=lambda r, m: print(
                                 f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}"
                                                                for k, v in m.items()),
                                 flush=True))
    record["samples"]["img_per_s"] = rates
    torchvision = [train for (name, _), train in loaders.items() if name == "torchvision"]
    record["facts"]["torchvision_failed_images"] = sum(t.bad_images.count for t in torchvision)
    record["facts"]["torchvision_images"] = sum(
        passes[key] * len(train) * args.batch_size for key, train in loaders.items()
        if key[0] == "torchvision")
    rows = []
    for w in args.workers:
        for name in LOADERS:
            spread = Spread.of(rates[f"{name} w{w}"])
            per_core = spread.median / w
            rows.append({"loader": name, "workers": w, "img_per_s": spread.to_json(),
                         "img_per_s_per_core": per_core,
                         "cores_per_gpu": {str(g): g / per_core for g in GPU_RATES},
                         "vs_torchvision": Spread.of_ratios(
                             rates[f"{name} w{w}"], rates[f"torchvision w{w}"]).to_json()})
    record["rows"]["cases"] = rows
    return record


def render(record: dict) -> str:
    m, p = record["machine"], record["params"]
    load = " and ".join(f"{x:g}" for x in m["load_average"])
    gpu = " / ".join(f"{g:,}" for g in p["gpu_rates"])
    lines = [f"# DeiT's training pipeline: torchvision against DALI's CPU pipeline "
             f"({record['date']})", "",
             f"Command: `{record['command']}`", "",
             f"Machine: {m['arch']}, {m['cores']} cores, {m['platform']}; the cores were "
             "shared with other engineers' jobs running at the same time (1-minute load "
             f"average {load} at the start and the end), so the absolute rates are low and "
             "noisy; the ratios, measured side by side in each round, are the figures to "
             "read.",
             f"Pipeline: recipes/imagenet/deit_small_base.yaml at {p['px']} px (bicubic "
             "random-resized crop, flip 0.5, RandAugment rand-m9-mstd0.5-inc1, repeats x3), "
             "normalised float32 channels-last batches on the CPU, random erasing left out "
             "(the GPU's work). torchvision: timm's RandAugment on PIL images in `workers` "
             "processes; DALI: its CPU pipeline (decode on the CPU; on a GPU machine DALI "
             "decodes and augments on the GPU) with `workers` threads.",
             f"Data: {p['images']} synthetic JPEGs (300-500 x 250-450 px, quality 90), batch "
             f"{p['batch_size']}, {p['rounds']} rounds in a rotating order; img/s median "
             "[min-max] of the passes, each timed from its second batch; DALI / torchvision: "
             "per-round ratios. Cores per GPU = the GPU's rate / img/s per core, for GPUs "
             f"training at {gpu} img/s (round numbers, not measured).",
             "torchvision ran with data.bad_images=skip: timm's RandAugment raised on "
             f"{record['facts']['torchvision_failed_images']} of the "
             f"{record['facts']['torchvision_images']:,} images it augmented (Pillow 13 refuses "
             "the 0 bits PosterizeIncreasing asks for at magnitude 10, which mstd 0.5 reaches "
             "in 2.3 % of draws), which the loader counts as unreadable and replaces with the "
             "next image; with the recipe's data.bad_images=error the pass stops there.", "",
             f"| loader | workers | img/s | img/s per core | vs torchvision | cores per GPU "
             f"at {gpu} img/s |", "|---|---|---|---|---|---|"]
    for row in record["rows"]["cases"]:
        cores = " / ".join(f"{c:.0f}" for c in row["cores_per_gpu"].values())
        ratio = Spread(**row["vs_torchvision"]).text(".2f")
        lines.append(f"| {row['loader']} | {row['workers']} | "
                     f"{Spread(**row['img_per_s']).text('.0f')} | "
                     f"{row['img_per_s_per_core']:.0f} | "
                     f"{'-' if row['loader'] == 'torchvision' else ratio} | {cores} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=whole_number(30), default=200,
                   help="JPEGs in the folder, 10 classes (default 200)")
    p.add_argument("--rounds", type=whole_number(1), default=3)
    p.add_argument("--batch-size", type=whole_number(1), default=32)
    p.add_argument("--workers", type=whole_number(1), nargs="+", default=[1, 2],
                   help="worker processes (torchvision) and threads (DALI) (default 1 2)")
    add_output_arguments(p)
    args = p.parse_args(argv)
    return run(args, argv, TOOL, TOOL_PATH, measure, render)


if __name__ == "__main__":
    main()
