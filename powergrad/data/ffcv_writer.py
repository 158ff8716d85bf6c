"""Write ImageFolder trees and Fashion-MNIST to ffcv .beton files, with a sidecar JSON
(class names, count, writer settings; see beton_meta.py).

Defaults follow ffcv-imagenet's ResNet-50 files: longest side at most 500 px, half of the
images stored as JPEG at quality 90 and half as raw pixels ('proportion'). Raw pixels skip the
JPEG decode at training time but take ~5x the disk; its ResNet-18 files used 400 px and 10 %
JPEG. Class indices follow torchvision's ImageFolder (sorted class folder names), so a model
trained on one loader evaluates correctly on the other.

The file is written under a temporary name and renamed into place when complete, so a crash
never leaves a half-written file at the target path.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from powergrad.data.beton_meta import write_sidecar
from powergrad.data.imagefolder_checks import ImageDataError, scan_image_folder


@dataclass
class ImageWriterSettings:
    """ffcv RGBImageField settings (see its docs for write_mode: raw | jpg | proportion | smart)."""
    max_resolution: int | None = 500  # longest side, px; None keeps the original size
    write_mode: str = "proportion"
    compress_probability: float = 0.5  # share stored as JPEG when write_mode='proportion'
    jpeg_quality: int = 90


class _ImageFolderSource:
    """Indexed dataset for ffcv's DatasetWriter. A file that fails to decode is logged to
    `error_log` and replaced by a placeholder: ffcv's writer waits forever for a sample whose
    worker raised, so errors are collected and raised after the workers finish."""

    def __init__(self, samples: list[tuple[str, int]], error_log: str):
        self.samples = samples
        self.error_log = error_log

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB")), label
        except Exception as e:  # PIL raises several unrelated types for bad files
            with open(self.error_log, "a") as log:  # one short line per write: O_APPEND-safe
                log.write(f"{path}: unreadable image ({type(e).__name__}: {e})\n")
            return np.zeros((8, 8, 3), np.uint8), label


class _GrayToRGBSource:
    """uint8 [N, H, W] grayscale images stored as RGB by repeating the channel, so the .beton
    works with the same RGB decoders and 3-channel models as ImageNet."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.repeat(self.images[index][:, :, None], 3, axis=2), int(self.labels[index])


def _check_target(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass overwrite=True (--overwrite) to "
                              "replace it")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst.parent}: output directory does not exist")


@contextmanager
def _temp_target(dst: Path):
    """Yield a temp path beside `dst`; rename it to `dst` only if the block completes."""
    tmp = dst.with_name(dst.name + f".partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _write_ffcv(path: Path, dataset, settings: ImageWriterSettings, workers: int) -> None:
    """ffcv's DatasetWriter with the two fields every powergrad .beton holds."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(write_mode=settings.write_mode,
                               max_resolution=settings.max_resolution,
                               compress_probability=settings.compress_probability,
                               jpeg_quality=settings.jpeg_quality),
        "label": IntField(),
    }
    DatasetWriter(str(path), fields, num_workers=workers).from_indexed_dataset(dataset)


def write_imagefolder_beton(src: str | os.PathLike, dst: str | os.PathLike, *,
                            settings: ImageWriterSettings | None = None, workers: int = -1,
                            overwrite: bool = False) -> Path:
    """Write the ImageFolder tree `src` (src/<class>/<image>) to the .beton `dst`.

    Checks the tree first (missing folder, empty class, non-image file) and decodes every
    image while writing; unreadable images are all named in one ImageDataError and no file is
    left at `dst`. workers=-1 uses every core.
    """
    settings = settings or ImageWriterSettings()
    src, dst = Path(src), Path(dst)
    _check_target(dst, overwrite)
    class_names, samples = scan_image_folder(src)
    with _temp_target(dst) as tmp, tempfile.NamedTemporaryFile("r", suffix=".errors") as log:
        _write_ffcv(tmp, _ImageFolderSource(samples, log.name), settings, workers)
        errors = log.read().splitlines()
        if errors:  # raised inside the block: nothing is renamed to dst
            shown = "\n  ".join(errors[:20])
            more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise ImageDataError(f"{src}: {len(errors)} unreadable images, nothing written "
                                 f"to {dst}:\n  {shown}{more}")
    write_sidecar(dst, class_names, len(samples), asdict(settings), str(src))
    return dst


def write_fashion_mnist_beton(root: str | os.PathLike, split: str, dst: str | os.PathLike, *,
                              limit: int | None = None, workers: int = -1,
                              overwrite: bool = False) -> Path:
    """Write a Fashion-MNIST split ('train' | 'test') to `dst` as 28x28 RGB raw pixels (the
    grey value repeated in the three channels; raw because JPEG would blur 28 px images and
    save nothing). `limit` keeps the first N examples."""
    from powergrad.data.fashion_mnist import CLASS_NAMES, load_split

    dst = Path(dst)
    _check_target(dst, overwrite)
    images, labels = load_split(root, split)
    images, labels = images[:limit].numpy(), labels[:limit].numpy()
    settings = ImageWriterSettings(max_resolution=None, write_mode="raw")
    with _temp_target(dst) as tmp:
        _write_ffcv(tmp, _GrayToRGBSource(images, labels), settings, workers)
    write_sidecar(dst, list(CLASS_NAMES), len(labels), asdict(settings),
                  f"fashion_mnist:{root}:{split}")
    return dst
