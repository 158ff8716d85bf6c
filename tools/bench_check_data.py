"""How fast `powergrad check-data` opens images, side by side with a full decode of the same
files, and what that means for ImageNet's 1,331,167 files.

Synthetic JPEGs of ImageNet's typical size (~400 x 350 px, tools/bench_loader.py's images) are
checked with 1 and N worker processes, interleaved round by round with decoding every pixel
(PIL's load(), what training does), so a slow spell of this shared machine hits both alike.
Prints a markdown table; writes it only with --write.

    python tools/bench_check_data.py --images 2000 --write results/bench_check_data.md
"""
from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from powergrad.commands.check_data import find_bad_images
from powergrad.data.imagenet_archives import IMAGENET
from powergrad.data.synthetic_images import write_synthetic_image_folder
from powergrad.errors import whole_number
from powergrad.training.machine_fit import usable_cores

IMAGENET_FILES = IMAGENET.train_images + IMAGENET.val_images


def decode_all(paths: list[str]) -> None:
    for path in paths:
        with Image.open(path) as img:
            img.load()


def rate(fn, paths: list[str]) -> float:
    start = time.perf_counter()
    fn(paths)
    return len(paths) / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=whole_number(64), default=2000)
    p.add_argument("--rounds", type=whole_number(1), default=3)
    p.add_argument("--write", default=None, metavar="MD", help="also write the table here")
    args = p.parse_args(argv)
    cores = usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        classes = [f"c{i}" for i in range(10)]
        items = write_synthetic_image_folder(tmp, classes, args.images // 10,
                                             width_range=(300, 500), height_range=(250, 450))
        paths = [str(path) for path, _ in items]
        cases = {"check-data, 1 process": lambda ps: find_bad_images(ps, 1),
                 f"check-data, {cores} processes": lambda ps: find_bad_images(ps, cores),
                 f"check-data --decode, {cores} processes":
                     lambda ps: find_bad_images(ps, cores, decode=True),
                 "full decode (PIL load), 1 process": decode_all}
        rates = {name: [] for name in cases}
        for round_ in range(args.rounds):
            order = list(cases) if round_ % 2 == 0 else list(reversed(cases))
            for name in order:
                rates[name].append(rate(cases[name], paths))
    decode = statistics.median(rates["full decode (PIL load), 1 process"])
    lines = [f"# check-data speed ({platform.node()}, {cores} cores, "
             f"{time.strftime('%Y-%m-%d')})", "",
             f"Command: `{shlex.join(['python', 'tools/bench_check_data.py', *sys.argv[1:]])}`",
             "", f"{len(paths)} synthetic JPEGs of 300-500 x 250-450 px, {args.rounds} rounds "
             "interleaved, the files in the page cache (on network storage opening files sets the "
             "pace); img/s median (min-max); ImageNet time = 1,331,167 files / rate.", "",
             "| what | img/s | vs full decode | ImageNet at this rate |", "|---|---|---|---|"]
    for name, values in rates.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.0f} ({min(values):.0f}-{max(values):.0f}) | "
                     f"{median / decode:.1f}x | {IMAGENET_FILES / median / 60:.0f} min |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        Path(args.write).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
