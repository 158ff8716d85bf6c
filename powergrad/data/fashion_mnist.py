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

from powergrad.system.distributed import DistInfo

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


def _split_paths(root: str | Path, split: str) -> list[Path]:
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths = [Path(root) / name for name in _FILES[split]]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DatasetMissingError(MISSING_HELP.format(path=missing[0]))
    return paths


def read_idx_dims(path: Path) -> tuple[int, ...]:
    """The dimensions an IDX file's header declares, reading only the header (and, for .gz,
    the gzip trailer's length, which catches a file cut short without decompressing it)."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:3] != b"\x00\x00\x08":
            raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic {head!r})")
        raw_dims = f.read(4 * head[3])
    if len(raw_dims) < 4 * head[3]:
        raise ValueError(f"{path}: IDX header cut short")
    dims = struct.unpack(f">{head[3]}I", raw_dims)
    expected = 4 + 4 * len(dims) + math.prod(dims)
    if path.suffix == ".gz":
        with open(path, "rb") as f:  # ISIZE: the uncompressed length mod 2**32 (RFC 1952)
            f.seek(-4, 2)
            stored = struct.unpack("<I", f.read(4))[0]
        if stored != expected % 2**32:
            raise ValueError(f"{path}: header says {dims} = {expected} bytes, the gzip "
                             f"trailer says {stored}: the file is cut short or damaged")
    elif path.stat().st_size != expected:
        raise ValueError(f"{path}: header says {dims} = {expected} bytes, the file has "
                         f"{path.stat().st_size}")
    return dims


def split_size(root: str | Path, split: str) -> int:
    """The number of examples in a split, from the IDX headers alone (no pixels read)."""
    images, labels = (read_idx_dims(p) for p in _split_paths(root, split))
    if images[0] != labels[0]:
        raise ValueError(f"{root}: {images[0]} images but {labels[0]} labels in {split}")
    return images[0]


def load_split(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 [N, 28, 28], labels int64 [N]) for split 'train' or 'test'."""
    root = Path(root)
    images, labels = (_read_idx(p) for p in _split_paths(root, split))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels in {split}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNISTLoader:
    """Batches of normalised [B, 1, 28, 28] images and int64 labels, already on `device`.

    Train order is a permutation seeded by (seed, epoch), so an epoch can be replayed exactly
    (the basis for resuming mid-epoch); under DDP each rank takes every world_size-th sample.
    Train augmentation: a random shift of up to `pad` pixels and a horizontal flip.
    """

    num_classes = len(CLASS_NAMES)
    class_names = list(CLASS_NAMES)
    skipped_images = 0  # the arrays hold no unreadable image
    batch_augment = None  # the shift and flip happen in __iter__

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 train: bool, seed: int = 0, device: torch.device | str = "cpu", pad: int = 2,
                 hflip: float = 0.5, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False):
        self.images = ((images.to(device, torch.float32) / 255.0 - MEAN) / STD).unsqueeze(1)
        self.labels = labels.to(device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.pad, self.hflip = (pad, hflip) if train else (0, 0.0)
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last
        self.epoch = 0
        self.resolution = images.shape[-1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = self.labels.shape[0]
        if not self.train:
            return torch.arange(n)[self.rank :: self.world_size]
        return torch.randperm(n, generator=self._generator(0))[self.rank :: self.world_size]

    def _generator(self, stream: int) -> torch.Generator:
        """Seeded by (seed, epoch): stream 0 draws the order, stream 1 the augmentation."""
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + stream)

    def __len__(self) -> int:
        n = len(range(self.rank, self.labels.shape[0], self.world_size))
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self):
        order = self._indices()
        gen = self._generator(1)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size].to(self.labels.device)
            x = self.images[idx]
            if self.train:
                x = self._augment(x, gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        batch, _, h, w = x.shape
        if self.pad > 0:  # shift: pad with the background value, then crop at random offsets
            background = (0.0 - MEAN) / STD
            padded = torch.nn.functional.pad(x, [self.pad] * 4, value=background)
            dy, dx = (torch.randint(0, 2 * self.pad + 1, (2, batch), generator=gen)
                      .to(x.device))
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
            x = padded[torch.arange(batch, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)
        if self.hflip > 0:
            flip = (torch.rand(batch, generator=gen) < self.hflip).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


def build_fashion_mnist_loaders(cfg, *, batch_size: int, eval_batch_size: int, seed: int,
                                device, dist_info: DistInfo = DistInfo(),
                                channels_last: bool = False):
    """Train and test loaders for a recipe's `data:` section (dataset: fashion_mnist); each
    process takes every dist_info.world_size-th sample from dist_info.rank."""
    train_x, train_y = load_split(cfg.root, "train")
    test_x, test_y = load_split(cfg.root, "test")
    if cfg.train_subset:
        train_x, train_y = train_x[: cfg.train_subset], train_y[: cfg.train_subset]
    if cfg.eval_subset:
        test_x, test_y = test_x[: cfg.eval_subset], test_y[: cfg.eval_subset]
    common = dict(seed=seed, device=device, rank=dist_info.rank,
                  world_size=dist_info.world_size, channels_last=channels_last)
    train = FashionMNISTLoader(train_x, train_y, batch_size=batch_size, train=True,
                               pad=cfg.pad, hflip=cfg.hflip, **common)
    test = FashionMNISTLoader(test_x, test_y, batch_size=eval_batch_size, train=False, **common)
    return train, test
