"""Write an ImageFolder tree or a Fashion-MNIST split to an ffcv .beton (+ .beton.json sidecar).

    python tools/write_ffcv.py imagefolder /data/imagenet/train /data/ffcv/train_500.beton
    python tools/write_ffcv.py imagefolder /data/imagenet/val /data/ffcv/val_500.beton
    python tools/write_ffcv.py fashion_mnist /usr/share/datasets/fashion-mnist/train fm_train.beton

Defaults are ffcv-imagenet's ResNet-50 files (500 px, 50 % JPEG at quality 90); its ResNet-18
files used --max-resolution 400 --compress-probability 0.1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from powergrad.data.ffcv_writer import (ImageWriterSettings, write_fashion_mnist_beton,  # noqa: E402
                                        write_imagefolder_beton)
from powergrad.data.imagefolder_checks import ImageDataError  # noqa: E402


def main(argv=None) -> None:
    defaults = ImageWriterSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("kind", choices=["imagefolder", "fashion_mnist"])
    p.add_argument("src", help="ImageFolder root, or <fashion-mnist root>/<train|test>")
    p.add_argument("dst", help="output .beton")
    p.add_argument("--max-resolution", type=int, default=defaults.max_resolution,
                   help="longest side in px; 0 keeps the original size")
    p.add_argument("--write-mode", default=defaults.write_mode,
                   choices=["raw", "jpg", "proportion", "smart"])
    p.add_argument("--compress-probability", type=float, default=defaults.compress_probability)
    p.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    p.add_argument("--workers", type=int, default=-1, help="processes; -1 = all cores")
    p.add_argument("--limit", type=int, default=None, help="fashion_mnist: first N only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dst")
    args = p.parse_args(argv)
    try:
        out = write(args)
    except (ImageDataError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {out}.json")


def write(args) -> Path:
    if args.kind == "imagefolder":
        settings = ImageWriterSettings(args.max_resolution or None, args.write_mode,
                                       args.compress_probability, args.jpeg_quality)
        return write_imagefolder_beton(args.src, args.dst, settings=settings,
                                       workers=args.workers, overwrite=args.overwrite)
    src = Path(args.src)
    return write_fashion_mnist_beton(src.parent, src.name, args.dst, limit=args.limit,
                                     workers=args.workers, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
