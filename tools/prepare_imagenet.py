"""Turn ILSVRC2012's official train and validation archives into the ImageFolder tree the loaders read, checking every count."""
from __future__ import annotations

import argparse
import codecs
import sys
import tarfile
from pathlib import Path

from powergrad.commands.arguments import whole_number
from powergrad.data.imagenet_archives import (ArchiveError, CountMismatch, Expected,
                                              prepare_imagenet)
from powergrad.errors import one_error_path

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
    if args.val_solution is not None:
        check_utf8_text(args.val_solution, "--val-solution")  # before minutes of md5 checks
    found = prepare_imagenet(args.train, args.val, args.out, devkit=args.devkit,
                             val_solution=args.val_solution, expected=expected,
                             overwrite=args.overwrite, check_md5=args.check_md5)
    print(f"wrote {args.out}: {len(found.train)} classes, {sum(found.train.values())} train "
          f"and {sum(found.val.values())} val images")
    return 0


def check_utf8_text(path: Path, option: str) -> None:
    """ArchiveError naming the option, the file and where, unless `path` is UTF-8 text: the
    labels are read as text, and a zipped or re-encoded CSV would stop the reading with a
    UnicodeDecodeError that names neither."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1  # of the bytes before the current chunk (read in chunks: a wrong
    with open(path, "rb") as f:  # file given here may be an archive of many GB)
        if f.read(4).startswith((b"PK\x03\x04", b"\x1f\x8b")):  # zip, gzip: as downloaded
            raise ArchiveError(f"{option} {path}: a compressed archive, not the CSV itself; "
                               "unpack it and name the .csv inside")
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:  # err.object: the chunk after up to 3 held bytes
                line = lines + err.object[:err.start].count(b"\n")
                where = (f"byte 0x{err.object[err.start]:02x} at offset "
                         f"{offset - len(err.object) + len(chunk) + err.start}, line {line}")
                raise ArchiveError(f"{option} {path}: not UTF-8 text ({where}); expected "
                                   "Kaggle's LOC_val_solution.csv as downloaded (ImageId,"
                                   "PredictionString rows)") from None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ArchiveError(f"{option} {path}: not UTF-8 text (its last bytes are a cut "
                               "character); expected Kaggle's LOC_val_solution.csv as "
                               "downloaded") from None


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
