"""The `data:` section of a recipe. Field names follow timm's train.py where it has one
(img_size, crop_pct, scale, ratio, hflip, workers) and ffcv-imagenet's for progressive
resizing (min_res, max_res, start_ramp, end_ramp)."""
from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    # fashion_mnist: Debian's IDX files in memory; imagefolder: ImageNet-style data read
    # from .beton files with ffcv or from ImageFolder trees with torchvision.
    dataset: str = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"  # fashion_mnist only
    loader: str = "auto"  # auto | ffcv | torchvision (imagefolder only)
    train_dir: str | None = None  # ImageFolder tree: train/<class>/*.JPEG
    val_dir: str | None = None
    train_beton: str | None = None  # ffcv files written by tools/write_ffcv.py
    val_beton: str | None = None
    workers: int = 2
    img_size: int = 224  # train resolution when min_res/max_res are not set
    val_img_size: int | None = None  # defaults to img_size
    crop_pct: float = 0.875  # validation centre crop, 224/256
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Progressive resizing as in ffcv-imagenet: resolution ramps linearly from min_res at
    # start_ramp to max_res at end_ramp (epochs), rounded to a multiple of 32.
    min_res: int | None = None
    max_res: int | None = None
    start_ramp: int = 0
    end_ramp: int = 0
    # ffcv: True reads the file through the OS page cache (ffcv-imagenet's in_memory=1, for
    # nodes whose memory holds the data set); False lets ffcv page it itself, which also
    # allows its QUASI_RANDOM order on one process.
    os_cache: bool = True
    # Fashion-MNIST augmentation: random shift by up to `pad` pixels and horizontal flip.
    pad: int = 2
    # Use only the first N train / eval examples (smoke tests, quick studies); null = all.
    train_subset: int | None = None
    eval_subset: int | None = None
    num_classes: int | None = None  # checked against the data when set
    extra: dict = field(default_factory=dict)
