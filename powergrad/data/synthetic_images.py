"""Deterministic synthetic JPEG ImageFolder trees for tests and loader benchmarks (no
ImageNet on disk is needed to check shapes, labels and throughput)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def textured_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour blobs plus fine noise: JPEG files of about the size and decode cost of
    photographs, unlike flat colour (too cheap) or white noise (too dear)."""
    coarse = rng.integers(0, 256, (rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_synthetic_image_folder(root: str | os.PathLike, class_names: list[str],
                                 per_class: int, *, width_range=(40, 90), height_range=(40, 90),
                                 seed: int = 0, quality: int = 90) -> list[tuple[Path, int]]:
    """Write root/<class>/<class>_<i>.JPEG with sizes drawn uniformly from the ranges;
    return [(path, class index)] in ImageFolder order. Same seed, same bytes."""
    rng = np.random.default_rng(seed)
    written = []
    for label, name in enumerate(sorted(class_names)):
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width = int(rng.integers(width_range[0], width_range[1] + 1))
            height = int(rng.integers(height_range[0], height_range[1] + 1))
            path = Path(root) / name / f"{name}_{i:05d}.JPEG"
            textured_image(rng, width, height).save(path, quality=quality)
            written.append((path, label))
    return written
