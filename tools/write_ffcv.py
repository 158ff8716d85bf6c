"""Write an ImageFolder tree or a Fashion-MNIST split to an ffcv .beton (+ .beton.json sidecar).

    python tools/write_ffcv.py imagefolder /data/imagenet/train /data/ffcv/train_500_0.50_90.beton
    python tools/write_ffcv.py imagefolder /data/imagenet/val /data/ffcv/val_500_0.50_90.beton
    python tools/write_ffcv.py fashion_mnist /usr/share/datasets/fashion-mnist runs/ffcv/fm_train.beton --split train

Missing parent folders of the output are created. Defaults are ffcv-imagenet's ResNet-50 files
(500 px, 50 % JPEG at quality 90); its ResNet-18 files used --max-resolution 400
--compress-probability 0.1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from powergrad.commands.arguments import number_in, whole_number
from powergrad.data.ffcv_writer import (ImageWriterSettings, write_fashion_mnist_beton,
                                        write_imagefolder_beton)
from powergrad.data.imagefolder_checks import ImageDataError
from powergrad.errors import one_error_path


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the usage examples above kept as written."""


def _main(argv=None) -> int:
    defaults = ImageWriterSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("kind", choices=["imagefolder", "fashion_mnist"], help="what SRC holds")
    p.add_argument("src", help="an ImageFolder root (<class>/<image> files), or the folder "
                               "holding Fashion-MNIST's four IDX .gz files")
    p.add_argument("dst", help="output .beton file")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="fashion_mnist: which split to write")
    p.add_argument("--max-resolution", type=whole_number(0), default=defaults.max_resolution,
                   help="longest side in px; 0 keeps the original size")
    p.add_argument("--write-mode", default=defaults.write_mode,
                   choices=["raw", "jpg", "proportion", "smart"], help="ffcv's RGBImageField mode")
    p.add_argument("--compress-probability", type=number_in(0, 1),
                   default=defaults.compress_probability,
                   help="share of images stored as JPEG with --write-mode proportion")
    p.add_argument("--jpeg-quality", type=whole_number(1, 100), default=defaults.jpeg_quality,
                   help="1-100")
    p.add_argument("--workers", type=whole_number(-1), default=-1,
                   help="processes; -1 = all cores")
    p.add_argument("--limit", type=whole_number(1), default=None,
                   help="fashion_mnist: write the first N images only (None: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    args = p.parse_intermixed_args(argv)
    if args.workers == 0:
        p.error("argument --workers: expected -1 (all cores) or a number of processes >= 1")
    from powergrad.training.machine_fit import usable_cores
    args.workers = usable_cores() if args.workers == -1 else min(args.workers, usable_cores())
    out = write(args)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {out}.json")
    return 0


def write(args) -> Path:
    if Path(args.dst).suffix != ".beton":
        raise ValueError(f"{args.dst}: expected an output file name ending in .beton")
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    if args.kind == "imagefolder":
        settings = ImageWriterSettings(args.max_resolution or None, args.write_mode,
                                       args.compress_probability, args.jpeg_quality)
        return write_imagefolder_beton(args.src, args.dst, settings=settings,
                                       workers=args.workers, overwrite=args.overwrite)
    src = Path(args.src)
    if not src.is_dir() and src.name in ("train", "test"):  # the old <root>/<split> spelling
        raise FileNotFoundError(f"{src}: no such folder; SRC is the folder holding the IDX "
                                f"files ({src.parent}), and --split {src.name} picks the split")
    return write_fashion_mnist_beton(src, args.split, args.dst, limit=args.limit,
                                     workers=args.workers, overwrite=args.overwrite)


def main(argv=None) -> int:
    """The tool with the one error path: an expected failure is one line and exit 2."""
    return one_error_path("write_ffcv", lambda: _main(argv),
                          expected=(ImageDataError, FileExistsError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
