"""How fast `powergrad check-data` opens images, side by side with a full decode of the same
files, and what that means for ImageNet's 1,331,167 files.

Synthetic JPEGs of ImageNet's typical size (~400 x 350 px, tools/bench_loader.py's images) are
checked with 1 and N worker processes, interleaved round by round with decoding every pixel
(PIL's load(), what training does; each round starts with the next case), so a slow spell of
this shared machine hits all alike. Writes a JSON record and renders the markdown table from it
(tools/bench_record.py); --render redraws a table from a record without measuring.

    python tools/bench_check_data.py --images 2000 --write results/bench_check_data.md
    python tools/bench_check_data.py --render results/bench_check_data.json \\
        --write results/bench_check_data.md
"""
from __future__ import annotations

import argparse
import tempfile

from bench_record import add_output_arguments, new_record, run
from bench_timing import Spread, seconds, side_by_side
from PIL import Image

from powergrad.commands.arguments import whole_number
from powergrad.commands.check_data import find_bad_images
from powergrad.data.imagenet_archives import IMAGENET
from powergrad.data.synthetic_images import write_synthetic_image_folder
from powergrad.training.machine_fit import usable_cores

TOOL, TOOL_PATH = "bench_check_data", "tools/bench_check_data.py"
IMAGENET_FILES = IMAGENET.train_images + IMAGENET.val_images
FULL_DECODE = "full decode (PIL load), 1 process"


def decode_all(paths: list[str]) -> None:
    for path in paths:
        with Image.open(path) as img:
            img.load()


def measure(args, command: str) -> dict:
    cores = usable_cores()
    record = new_record(TOOL, command, {"images": args.images, "rounds": args.rounds,
                                        "processes": cores})
    with tempfile.TemporaryDirectory() as tmp:
        classes = [f"c{i}" for i in range(10)]
        items = write_synthetic_image_folder(tmp, classes, args.images // 10,
                                             width_range=(300, 500), height_range=(250, 450))
        paths = [str(path) for path, _ in items]
        record["params"]["images"] = len(paths)
        cases = {"check-data, 1 process": lambda ps: find_bad_images(ps, 1),
                 f"check-data, {cores} processes": lambda ps: find_bad_images(ps, cores),
                 f"check-data --decode, {cores} processes":
                     lambda ps: find_bad_images(ps, cores, decode=True),
                 FULL_DECODE: decode_all}
        rates = side_by_side({name: (lambda fn=fn: len(paths) / seconds(lambda: fn(paths)))
                              for name, fn in cases.items()}, args.rounds)
    record["samples"]["img_per_s"] = rates
    decode = Spread.of(rates[FULL_DECODE]).median
    record["rows"]["cases"] = [
        {"what": name, "img_per_s": Spread.of(values).to_json(),
         "vs_full_decode": Spread.of(values).median / decode,
         "imagenet_minutes": IMAGENET_FILES / Spread.of(values).median / 60}
        for name, values in rates.items()]
    return record


def render(record: dict) -> str:
    m, p = record["machine"], record["params"]
    lines = [f"# check-data speed ({m['node']}, {p['processes']} cores, {record['date']})", "",
             f"Command: `{record['command']}`", "",
             f"{p['images']} synthetic JPEGs of 300-500 x 250-450 px, {p['rounds']} rounds "
             "interleaved, the files in the page cache (on network storage opening files sets "
             f"the pace); img/s median [min-max]; ImageNet time = {IMAGENET_FILES:,} files / "
             "rate.", "",
             "| what | img/s | vs full decode | ImageNet at this rate |", "|---|---|---|---|"]
    for row in record["rows"]["cases"]:
        lines.append(f"| {row['what']} | {Spread(**row['img_per_s']).text('.0f')} | "
                     f"{row['vs_full_decode']:.1f}x | {row['imagenet_minutes']:.0f} min |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=whole_number(64), default=2000)
    p.add_argument("--rounds", type=whole_number(1), default=3)
    add_output_arguments(p)
    args = p.parse_args(argv)
    return run(args, argv, TOOL, TOOL_PATH, measure, render)


if __name__ == "__main__":
    main()
