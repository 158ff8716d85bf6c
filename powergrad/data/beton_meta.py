"""The sidecar JSON written next to every .beton (`<file>.beton.json`) and the checks a loader
runs on a .beton before training.

ffcv stores no class names and none of the writer's settings in the file, so the sidecar
records them; its byte count also catches a .beton that was cut short or replaced.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from powergrad.data.imagefolder_checks import ImageDataError

SIDECAR_FORMAT = "powergrad-beton/1"
# The fields every powergrad .beton holds, in this order (ffcv-imagenet's names too).
EXPECTED_FIELDS = {"image": "RGBImageField", "label": "IntField"}


def sidecar_path(beton: str | os.PathLike) -> Path:
    return Path(f"{beton}.json")


@dataclass
class BetonInfo:
    path: Path
    class_names: list[str]
    num_samples: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def write_sidecar(beton: str | os.PathLike, class_names: list[str], num_samples: int,
                  writer_settings: dict, source: str) -> Path:
    """Write the sidecar atomically (temp file + rename); call it after the .beton is final."""
    beton = Path(beton)
    record = {
        "format": SIDECAR_FORMAT,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "num_samples": int(num_samples),
        "beton_bytes": beton.stat().st_size,
        "fields": EXPECTED_FIELDS,
        "writer": writer_settings,
        "source": source,
    }
    target = sidecar_path(beton)
    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, target)
    return target


def _check_ffcv_layout(path: Path) -> int:
    """Open the file with ffcv's Reader and check its fields and that every sample's data lies
    inside the file; return the sample count."""
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE

    try:
        reader = Reader(str(path))
    except Exception as e:  # a short header or garbage makes numpy/ffcv raise several types
        raise ImageDataError(f"{path}: .beton is truncated or corrupt, ffcv cannot read it "
                             f"({type(e).__name__}: {e}); rewrite it") from e
    fields = {name: type(h).__name__ for name, h in reader.handlers.items()}
    if fields != EXPECTED_FIELDS:
        raise ImageDataError(f"{path}: .beton has fields {fields}, expected {EXPECTED_FIELDS} "
                             "(write it with tools/write_ffcv.py)")
    size = path.stat().st_size
    table_ptr = int(reader.header["alloc_table_ptr"])
    table_bytes = size - table_ptr
    truncated = table_ptr > size or table_bytes % ALLOC_TABLE_TYPE.itemsize != 0
    if not truncated and len(reader.alloc_table):
        ends = reader.alloc_table["ptr"] + reader.alloc_table["size"]
        truncated = int(ends.max()) > table_ptr
    if truncated or len(reader.metadata) != int(reader.num_samples):
        raise ImageDataError(f"{path}: .beton is truncated or corrupt ({size} bytes); rewrite it")
    return int(reader.num_samples)


def read_beton_info(beton: str | os.PathLike, num_classes: int | None = None) -> BetonInfo:
    """Check a .beton and its sidecar; return its class names and sample count.

    Without a sidecar (a file written by other tools, e.g. ffcv-imagenet's script) the class
    names are '0'..'N-1' and `num_classes` must be given.
    """
    path = Path(beton)
    if not path.is_file():
        raise ImageDataError(f"{path}: .beton file does not exist; write it with "
                             "tools/write_ffcv.py (README: ImageNet), or read JPEG folders: "
                             "data.loader=torchvision with data.train_dir and data.val_dir")
    num_samples = _check_ffcv_layout(path)
    meta_path = sidecar_path(path)
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ImageDataError(f"{meta_path}: sidecar is not valid JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ImageDataError(f"{meta_path}: unknown sidecar format {found!r}")
        wanted = {"beton_bytes": int, "num_samples": int, "class_names": list}
        wrong = [f"{key} ({kind.__name__})" for key, kind in wanted.items()
                 if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool)]
        if wrong:
            raise ImageDataError(f"{meta_path}: sidecar lacks or garbles {', '.join(wrong)}; "
                                 "rewrite the .beton and its sidecar with tools/write_ffcv.py")
        if meta["beton_bytes"] != path.stat().st_size or meta["num_samples"] != num_samples:
            raise ImageDataError(
                f"{path}: file does not match its sidecar {meta_path} ({path.stat().st_size} "
                f"bytes / {num_samples} samples, sidecar says {meta['beton_bytes']} / "
                f"{meta['num_samples']}); it was cut short or replaced: rewrite it")
        class_names = list(meta["class_names"])
    elif num_classes is None:
        raise ImageDataError(f"{path}: no sidecar {meta_path}; set data.num_classes or rewrite "
                             "the file with tools/write_ffcv.py")
    else:
        class_names = [str(i) for i in range(num_classes)]
    if num_classes is not None and num_classes != len(class_names):
        raise ImageDataError(f"{path}: holds {len(class_names)} classes but data.num_classes "
                             f"is {num_classes}")
    return BetonInfo(path, class_names, num_samples)
