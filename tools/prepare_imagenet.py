"""Turn ILSVRC2012's official train and validation archives into the ImageFolder tree the loaders read, checking every count."""
from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

from powergrad.data.imagenet_archives import (ArchiveError, CountMismatch, Expected,
                                              prepare_imagenet)
from powergrad.errors import one_error_path, whole_number

EPILOG = """example:
  python tools/prepare_imagenet.py --train ILSVRC2012_img_train.tar \\
      --val ILSVRC2012_img_val.tar --devkit ILSVRC2012_devkit_t12.tar.gz /data/imagenet

writes /data/imagenet/train/<wnid>/*.JPEG and /data/imagenet/val/<wnid>/*.JPEG (about 150 GB,
built beside the output folder and renamed into place only once the counts are right)."""


def _main(argv=None) -> int:
    imagenet = Expected()
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=_Formatter)
    p.add_argument("out", type=Path, help="output folder, gets train/ and val/")
    p.add_argument("--train", required=True, type=Path, metavar="TAR", help="ILSVRC2012_img_train.tar")
    p.add_argument("--val", required=True, type=Path, metavar="TAR", help="ILSVRC2012_img_val.tar")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--devkit", type=Path, metavar="TAR_GZ",
                        help="ILSVRC2012_devkit_t12.tar.gz: validation labels (needs scipy)")
    labels.add_argument("--val-solution", type=Path, metavar="CSV",
                        help="Kaggle's LOC_val_solution.csv: validation labels")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-md5", dest="check_md5", action="store_false",
                   help="skip the md5 check of the archives against the official ones")
    p.add_argument("--expected-classes", type=whole_number(1), metavar="N", default=imagenet.classes,
                   help="classes in train and in val")
    p.add_argument("--expected-train-images", type=whole_number(1), metavar="N", default=imagenet.train_images,
                   help="train images in all")
    p.add_argument("--expected-val-per-class", type=whole_number(1), metavar="N", default=imagenet.val_per_class,
                   help="validation images in every class")
    args = p.parse_args(argv)
    expected = Expected(args.expected_classes, args.expected_train_images,
                        args.expected_val_per_class)
    for name in ("train", "val", "devkit", "val_solution"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            p.error(f"argument --{name.replace('_', '-')}: {path} is not a file")
    found = prepare_imagenet(args.train, args.val, args.out, devkit=args.devkit,
                             val_solution=args.val_solution, expected=expected,
                             overwrite=args.overwrite, check_md5=args.check_md5)
    print(f"wrote {args.out}: {len(found.train)} classes, {sum(found.train.values())} train "
          f"and {sum(found.val.values())} val images")
    return 0


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where there is one (not for required paths and flags), and the example
    kept as written."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def main(argv=None) -> int:
    """The tool with the one error path: an expected failure is one line and exit 2."""
    return one_error_path("prepare_imagenet", lambda: _main(argv), expected=(
        ArchiveError, CountMismatch, FileExistsError, tarfile.TarError))


if __name__ == "__main__":
    sys.exit(main())
