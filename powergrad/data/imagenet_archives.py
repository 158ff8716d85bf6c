"""ImageNet-1k (ILSVRC2012) from the official archives to the ImageFolder tree the loaders read:
<out>/train/<wnid>/*.JPEG and <out>/val/<wnid>/*.JPEG.

Built on torchvision.datasets.imagenet: its archive names and md5 sums (ARCHIVE_META), its
check_integrity and extract_archive. Its parse_*_archive functions are not called: they always
check the md5 of the official files (so no small archive, and no copy already verified, gets
through), the devkit parser is a nested function that writes meta.bin next to the archives,
parse_val_archive pairs labels with files by position (zip() drops the surplus silently), and
parse_train_archive first writes all 138 GB of inner tars to disk, with no progress shown.

The tree is built in a sibling folder whose name says it is incomplete and renamed to <out>
only after every count checks out: an <out> this tool made is complete.
"""
from __future__ import annotations

import csv
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets.imagenet import ARCHIVE_META
from torchvision.datasets.utils import check_integrity, extract_archive

from powergrad.system.progress import with_progress

WNID = re.compile(r"n\d{8}")
CLASS_TAR = re.compile(r"(n\d{8})\.tar")
DEVKIT_DIR = "ILSVRC2012_devkit_t12"


class ArchiveError(ValueError):
    """An archive or label file is missing, corrupt or malformed; the message names it."""


class CountMismatch(ValueError):
    """The extracted tree does not hold the expected classes and images."""


@dataclass(frozen=True)
class Expected:
    """What a complete tree holds; the defaults are ILSVRC2012's."""
    classes: int = 1000
    train_images: int = 1_281_167
    val_per_class: int = 50

    @property
    def val_images(self) -> int:
        return self.classes * self.val_per_class


IMAGENET = Expected()  # ILSVRC2012's counts, written here only (describe, gpu-check, tools)


@dataclass
class Found:
    """What extraction produced, and what it had to leave out."""
    train: dict[str, int] = field(default_factory=dict)       # wnid -> images
    val: dict[str, int] = field(default_factory=dict)         # wnid -> images
    stray_train_entries: list[str] = field(default_factory=list)  # not nXXXXXXXX.tar
    unlabelled_val: list[str] = field(default_factory=list)   # in the archive, no label
    absent_val: list[str] = field(default_factory=list)       # labelled, not in the archive


# ---------------------------------------------------------------- archives and labels

def verify_md5(path: str | os.PathLike, kind: str) -> None:
    """Check `path` against torchvision's md5 for the official `kind` archive
    ("train", "val" or "devkit")."""
    name, md5 = ARCHIVE_META[kind]
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    print(f"checking the md5 of {path} ({size / 1e9:.1f} GB)",
          flush=True)
    if not check_integrity(path, md5):
        raise ArchiveError(f"{path}: missing, or its md5 is not that of the official {name} "
                           f"({md5}); pass --no-md5 to skip this check")


def read_val_solution_csv(path: str | os.PathLike) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv -> {image stem: wnid}. Each PredictionString lists
    boxes as "wnid x0 y0 x1 y1 ..."; an image's class is the first box's wnid."""
    labels = {}
    try:  # Kaggle writes UTF-8 (ASCII in fact); not the locale's encoding
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(
                    reader.fieldnames):
                raise ArchiveError(f"{path}: expected the columns ImageId,PredictionString")
            for line, row in enumerate(reader, start=2):
                tokens = (row["PredictionString"] or "").split()
                if not tokens or not WNID.fullmatch(tokens[0]):
                    raise ArchiveError(f"{path}:{line}: PredictionString does not start with "
                                       "a wnid")
                if row["ImageId"] in labels:
                    raise ArchiveError(f"{path}:{line}: {row['ImageId']} is labelled twice")
                labels[row["ImageId"]] = tokens[0]
    except UnicodeDecodeError as err:
        raise ArchiveError(f"{path}: not UTF-8 text (a byte {err.object[err.start]:#04x}); "
                           "expected Kaggle's LOC_val_solution.csv, unpacked") from None
    return labels


def read_meta_mat(path: str | os.PathLike) -> dict[int, str]:
    """The devkit's data/meta.mat -> {ILSVRC2012_ID: wnid} for the 1,000 leaf synsets.
    The same reading as torchvision's parse_devkit_archive, which keeps it in a nested
    function behind the md5 check."""
    try:
        import scipy.io
    except ImportError:
        raise ArchiveError("reading the devkit's meta.mat needs scipy (pip install scipy); "
                           "or label the validation images with --val-solution "
                           "LOC_val_solution.csv") from None
    try:
        synsets = scipy.io.loadmat(str(path), squeeze_me=True)["synsets"]
        # columns: ILSVRC2012_ID, WNID, words, gloss, num_children, ...; leaves are the classes
        return {int(s[0]): str(s[1]) for s in synsets if int(s[4]) == 0}
    except Exception as err:  # scipy raises many types for a file that is not its format
        raise ArchiveError(f"{path.name} in the devkit cannot be read ({type(err).__name__}); "
                           "the devkit archive is damaged or not ILSVRC2012's: check it, or "
                           "label with --val-solution LOC_val_solution.csv") from None


def read_devkit(path: str | os.PathLike) -> dict[str, str]:
    """ILSVRC2012_devkit_t12.tar.gz -> {image stem: wnid}: line i of the ground truth is the
    ILSVRC2012_ID of ILSVRC2012_val_<i, 8 digits>."""
    with tempfile.TemporaryDirectory() as tmp:
        extract_archive(str(path), tmp)
        data = Path(tmp) / DEVKIT_DIR / "data"
        if not data.is_dir():
            raise ArchiveError(f"{path}: no {DEVKIT_DIR}/data folder inside")
        idx_to_wnid = read_meta_mat(data / "meta.mat")
        ids = (data / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    unknown = sorted({i for i in map(int, ids) if i not in idx_to_wnid})
    if unknown:
        raise ArchiveError(f"{path}: ground truth uses ids not in meta.mat: {_some(unknown)}")
    return {f"ILSVRC2012_val_{i:08d}": idx_to_wnid[int(idx)] for i, idx in enumerate(ids, 1)}


# ---------------------------------------------------------------- extraction

def extract_train(train_tar: str | os.PathLike, dst: Path) -> list[str]:
    """Extract each inner nXXXXXXXX.tar of the train archive into dst/<wnid>/, streaming it
    from the outer tar (no 138 GB of inner tars on disk). Returns the outer entries that are
    not class tars, which are left out."""
    stray = []
    dst.mkdir()
    with tarfile.open(train_tar, "r:") as outer:
        members = outer.getmembers()  # headers only: the outer tar is uncompressed, so cheap
        for member in with_progress(members, "train archive", unit="class"):
            match = CLASS_TAR.fullmatch(posixpath.basename(member.name))
            class_dir = dst / match[1] if match else None
            if not member.isfile() or class_dir is None or class_dir.exists():
                stray.append(member.name)
                continue
            class_dir.mkdir()
            with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as inner:
                inner.extractall(class_dir, filter="data")  # "data": no paths out of class_dir
    return stray


def extract_val(val_tar: str | os.PathLike, dst: Path,
                labels: dict[str, str]) -> tuple[list[str], list[str]]:
    """Extract the flat validation archive into dst and move every image to dst/<wnid>/ by
    its name's label. Returns (images with no label, left in dst; labelled images that the
    archive lacks)."""
    print(f"extracting {val_tar} ({os.path.getsize(val_tar) / 1e9:.1f} GB)", flush=True)
    extract_archive(str(val_tar), str(dst))
    files = sorted(e.name for e in os.scandir(dst) if e.is_file())
    unlabelled = []
    for name in with_progress(files, "val archive", unit="img"):
        wnid = labels.get(Path(name).stem)
        if wnid is None:
            unlabelled.append(name)
            continue
        (dst / wnid).mkdir(exist_ok=True)
        os.replace(dst / name, dst / wnid / name)
    present = {Path(name).stem for name in files}
    absent = sorted(stem for stem in labels if stem not in present)
    return unlabelled, absent


# ---------------------------------------------------------------- counts

def count_images(split_dir: Path) -> dict[str, int]:
    """{class folder: number of files in it}, hidden files ignored as ImageFolder does."""
    return {d.name: sum(1 for f in os.scandir(d) if f.is_file() and not f.name.startswith("."))
            for d in os.scandir(split_dir) if d.is_dir()}


def count_problems(found: Found, expected: Expected) -> list[str]:
    """Every way `found` differs from `expected`, one line each, naming classes and images."""
    problems = []
    train, val = set(found.train), set(found.val)
    for split, classes in (("train", train), ("val", val)):
        if len(classes) != expected.classes:
            problems.append(f"{split}: {_n(len(classes), 'class')}, expected {expected.classes}")
    if val - train:
        problems.append(f"{_n(len(val - train), 'class')} in val missing from train: "
                        f"{_some(sorted(val - train))}")
    if train - val:
        problems.append(f"{_n(len(train - val), 'class')} in train missing from val: "
                        f"{_some(sorted(train - val))}")
    empty = sorted(w for w, n in found.train.items() if n == 0)
    if empty:
        problems.append(f"train: {_n(len(empty), 'empty class')}: {_some(empty)}")
    for split, counts, want in (("train", found.train, expected.train_images),
                                ("val", found.val, expected.val_images)):
        total = sum(counts.values())
        if total != want:
            problems.append(f"{split}: {_n(total, 'image')}, expected {want} "
                            f"({_signed(total - want)})")
    off = sorted((w, n) for w, n in found.val.items() if n != expected.val_per_class)
    if off:
        problems.append(f"val: {_n(len(off), 'class')} without {expected.val_per_class} images: "
                        + _some([f"{w} has {n}" for w, n in off]))
    if found.stray_train_entries:
        problems.append(f"train archive: {_n(len(found.stray_train_entries), 'entry')} not a "
                        f"new nXXXXXXXX.tar class archive, left out: "
                        f"{_some(found.stray_train_entries)}")
    if found.unlabelled_val:
        problems.append(f"val archive: {_n(len(found.unlabelled_val), 'image')} with no label: "
                        f"{_some(found.unlabelled_val)}")
    if found.absent_val:
        problems.append(f"val labels: {_n(len(found.absent_val), 'labelled image')} not in the "
                        f"archive: {_some(found.absent_val)}")
    return problems


def _some(items: list, limit: int = 10) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _n(count: int, noun: str) -> str:
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + ("es" if noun.endswith("s") else "s")
    return f"{count} {noun if count == 1 else plural}"


def _signed(n: int) -> str:
    return f"{n} more" if n > 0 else f"{-n} fewer"


# ---------------------------------------------------------------- the whole job

def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass --overwrite to replace it")


@contextmanager
def staged_dir(out: Path, overwrite: bool):
    """Yield an empty folder beside `out` (same file system, so the final rename is atomic);
    on success it replaces `out`, on any error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.incomplete-", dir=out.parent))
    try:
        yield tmp
        check_target(out, overwrite)  # again: something may have appeared meanwhile
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:  # Ctrl-C included: never leave a partial tree behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_imagenet(train_tar: str | os.PathLike, val_tar: str | os.PathLike,
                     out: str | os.PathLike, *, devkit: str | os.PathLike | None = None,
                     val_solution: str | os.PathLike | None = None,
                     expected: Expected = Expected(), overwrite: bool = False,
                     check_md5: bool = True, log=print) -> Found:
    """Build <out>/train and <out>/val from the official archives, labelling validation by
    the devkit or by LOC_val_solution.csv (exactly one). Raises CountMismatch, listing every
    problem, when the result differs from `expected`; <out> is then left untouched."""
    if (devkit is None) == (val_solution is None):
        raise ValueError("give exactly one of devkit and val_solution")
    out = Path(out)
    check_target(out, overwrite)  # before hours of work, not after
    if check_md5:
        for kind, path in (("devkit", devkit), ("val", val_tar), ("train", train_tar)):
            if path is not None:
                log(f"checking the md5 of {path} (minutes for the train archive)")
                verify_md5(path, kind)
    labels = read_devkit(devkit) if devkit is not None else read_val_solution_csv(val_solution)
    with staged_dir(out, overwrite) as tmp:
        unlabelled, absent = extract_val(val_tar, tmp / "val", labels)
        stray = extract_train(train_tar, tmp / "train")
        found = Found(count_images(tmp / "train"), count_images(tmp / "val"), stray,
                      unlabelled, absent)
        problems = count_problems(found, expected)
        if problems:
            raise CountMismatch("the archives do not give the expected tree "
                                f"({expected.classes} classes, {expected.train_images} train "
                                f"and {expected.val_images} val images); {out} was not "
                                "written:\n  " + "\n  ".join(problems))
    return found
