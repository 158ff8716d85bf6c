"""Small JPEG ImageFolder trees and broken inputs for the image-data tests."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from powergrad.data.synthetic_images import write_synthetic_image_folder

CLASSES = ["ant", "bee", "cat"]


def textured_folder(root: Path, per_class: int = 8, seed: int = 0) -> list[tuple[Path, int]]:
    """Images of varied size (40-90 px a side); returns [(path, label)] in ImageFolder order."""
    return write_synthetic_image_folder(root, CLASSES, per_class, seed=seed)


def imagenet_format(root: Path, train_per_class: int, val_per_class: int) -> Path:
    """root/train and root/val in ImageNet's ImageFolder layout, of textured images."""
    textured_folder(root / "train", per_class=train_per_class)
    textured_folder(root / "val", per_class=val_per_class, seed=1)
    return root


def constant_colour_folder(root: Path, per_class: int = 3) -> list[tuple[np.ndarray, int]]:
    """One flat colour per image, varied sizes; returns [(decoded RGB colour, label)] in
    ImageFolder order, the colour read back from the file with PIL (JPEG may shift it)."""
    rng = np.random.default_rng(7)
    expected = []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            path = root / name / f"{i}.jpg"
            Image.new("RGB", size, colour).save(path, quality=95)
            pixels = np.asarray(Image.open(path).convert("RGB"))
            assert (pixels == pixels[0, 0]).all(), "test image must decode to one colour"
            expected.append((pixels[0, 0].astype(np.float64), label))
    return expected


def tiny_folder(root: Path) -> Path:
    """Two classes of two good images: the base that the bad-input tests break."""
    write_synthetic_image_folder(root, ["a", "b"], 2, seed=3)
    return root


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file, the format of the Fashion-MNIST files."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
