"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package, read from its IDX files with
no download, held in memory and batched on the training device.

A tensor-resident loader instead of torch's DataLoader: the whole set is 47 MB, and per-sample
Python transforms would cost more than the small models this set trains on the CPU.
"""
from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Mean and std of the training pixels in [0, 1] (computed from the train split).
MEAN, STD = 0.2860, 0.3530

MISSING_HELP = (
    "Fashion-MNIST not found at {path}. Install Debian's copy (no download at run time):\n"
    "    apt-get install dataset-fashion-mnist\n"
    "or point `data.root` at a folder holding the four IDX .gz files."
)


class DatasetMissingError(FileNotFoundError):
    pass


def _read_idx(path: Path) -> np.ndarray:
    """Parse one (optionally gzipped) IDX file: magic, dims, then big-endian uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} = {math.prod(dims)} bytes, found {data.size}")
    return data.reshape(dims)


def load_split(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 [N, 28, 28], labels int64 [N]) for split 'train' or 'test'."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    paths = [root / name for name in _FILES[split]]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DatasetMissingError(MISSING_HELP.format(path=missing[0]))
    images, labels = (_read_idx(p) for p in paths)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels in {split}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
