"""Checks on ImageFolder trees (root/<class>/<image>) that fail fast with the offending path,
before a loader or a writer starts: a bad file found in hour three of training costs a run."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes


class ImageDataError(ValueError):
    """Bad image data on disk; the message names the path."""


def scan_image_folder(root: str | os.PathLike, problems: list[str] | None = None
                      ) -> tuple[list[str], list[tuple[str, int]]]:
    """Return (class names, [(path, class index)]) exactly as torchvision's ImageFolder orders
    them (sorted class folders, sorted files), after checking the tree's structure.

    Raises ImageDataError for a missing root, a root with no class folders, a class folder with
    no images, or a file whose extension is not an image's (torchvision would silently skip it,
    hiding a broken copy). Hidden files (.DS_Store and the like) are ignored. With a
    `problems` list, the problems of files and class folders are appended to it instead (each
    a line naming the path) and those files left out, so every one can be listed.
    """
    def problem(message: str) -> None:
        if problems is None:
            raise ImageDataError(message)
        problems.append(message)

    root = Path(root)
    if not root.is_dir():
        raise ImageDataError(f"{root}: image folder does not exist or is not a directory")
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        raise ImageDataError(f"{root}: no class folders found (expected {root}/<class>/<image>)")
    samples = []
    for name in classes:
        class_dir = root / name
        # scandir's entry types come with the listing: no stat per file on ImageNet's 1.3 M
        entries = sorted((e for e in os.scandir(class_dir) if not e.name.startswith(".")),
                         key=lambda e: e.name)
        if not entries:
            problem(f"{class_dir}: class folder is empty; expected images in every class "
                    "folder (remove the folder, or add its images)")
        for entry in entries:
            path = class_dir / entry.name
            if not entry.is_file():
                problem(f"{path}: nested folders are not supported in a class folder")
            elif not entry.name.lower().endswith(IMG_EXTENSIONS):
                problem(f"{path}: not an image file (extensions allowed: "
                        f"{', '.join(IMG_EXTENSIONS)}); move it out of the class folder")
            else:
                samples.append((str(path), class_to_idx[name]))
    return classes, samples


# A JPEG ends with FF D9; some cameras and editors pad after it, so look in the last bytes.
_JPEG_END = b"\xff\xd9"
_JPEG_TAIL_BYTES = 4096


def image_problem(path: str, decode: bool = False) -> str | None:
    """Why the image file at `path` cannot be trained on, or None when it is sound. The header,
    size and structure are read (and a JPEG's end marker); decode=True also decodes every
    pixel, which finds damage inside a JPEG's coded data too (about 10x slower)."""
    try:
        with Image.open(path) as img:
            kind, (width, height) = img.format, img.size
            img.verify()
        if decode:
            with Image.open(path) as img:  # verify() leaves the image unusable: open again
                img.load()
        if width < 1 or height < 1:
            return f"{width} x {height} px"
        if kind == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - _JPEG_TAIL_BYTES))
                if _JPEG_END not in f.read():
                    return "JPEG is truncated (no end-of-image marker)"
    except Exception as err:  # PIL raises many unrelated types for bad files
        return f"{type(err).__name__}: {' '.join(str(err).split())}"
    return None


def verify_image(path: str | os.PathLike) -> None:
    """Raise ImageDataError naming `path` when it is not a sound image (image_problem)."""
    why = image_problem(str(path))
    if why is not None:
        raise ImageDataError(f"{path}: unreadable image ({why})")


def verify_sample(samples: list[tuple[str, int]], per_class: int = 2) -> None:
    """Verify the first and last `per_class` files of every class: catches a wrong or broken
    copy of a folder in seconds, where verifying all of ImageNet would take minutes."""
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    for paths in by_class.values():
        for path in dict.fromkeys(paths[:per_class] + paths[-per_class:]):
            verify_image(path)
