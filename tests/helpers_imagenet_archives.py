"""A tiny archive set laid out like ILSVRC2012's (a train tar of per-class tars, a flat
validation tar, a devkit tar.gz and a LOC_val_solution.csv) for tools/prepare_imagenet.py's
tests and the README's ImageNet steps (tests/test_readme.py)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

TRAIN = {"n01440764": 3, "n01443537": 2, "n01484850": 4}  # wnid -> train images
# class of validation image i + 1; not in class order, as in ILSVRC2012
VAL = ["n01484850", "n01440764", "n01443537", "n01440764", "n01484850", "n01443537"]
# the devkit numbers classes by ILSVRC2012_ID, not in wnid order; 4 is a non-leaf synset
IDS = {1: "n01484850", 2: "n01440764", 3: "n01443537"}
TINY = ["--no-md5", "--expected-classes", "3", "--expected-train-images", "9",
        "--expected-val-per-class", "2"]


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (seed * 37 % 256, seed * 91 % 256, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def build(root: Path, train=TRAIN, val=VAL, *, stray_train=(), extra_val=(), drop_val=(),
          broken_class=None, meta_mat: bytes | None = None) -> dict[str, bytes]:
    """Write the archives into root; return the tree they should give, {relative path: bytes}."""
    root.mkdir(parents=True, exist_ok=True)
    tree, class_tars = {}, {}
    for c, (wnid, n) in enumerate(train.items()):
        images = {f"{wnid}_{k}.JPEG": _jpeg(100 * c + k) for k in range(n)}
        tree.update({f"train/{wnid}/{name}": data for name, data in images.items()})
        class_tars[f"{wnid}.tar"] = b"not a tar" * 100 if wnid == broken_class else _tar(images)
    class_tars.update({name: b"stray" for name in stray_train})
    (root / "ILSVRC2012_img_train.tar").write_bytes(_tar(class_tars))

    val_files = {}
    for i, wnid in enumerate(val, 1):
        val_files[val_name(i)] = _jpeg(1000 + i)
        tree[f"val/{wnid}/{val_name(i)}"] = val_files[val_name(i)]
    for i in drop_val:
        del val_files[val_name(i)]
    val_files.update({name: _jpeg(5000 + k) for k, name in enumerate(extra_val)})
    (root / "ILSVRC2012_img_val.tar").write_bytes(_tar(val_files))

    rows = [f"{val_name(i)[:-5]},{wnid} 1 2 7 5 {wnid} 0 0 3 3 " for i, wnid in enumerate(val, 1)]
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")
    wnid_to_id = {w: i for i, w in IDS.items()}
    truth = "".join(f"{wnid_to_id[w]}\n" for w in val).encode()
    data = "ILSVRC2012_devkit_t12/data/"
    (root / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(_tar({
        data + "meta.mat": json.dumps(IDS).encode() if meta_mat is None else meta_mat,
        data + "ILSVRC2012_validation_ground_truth.txt": truth}, mode="w:gz"))
    return tree


def real_meta_mat() -> bytes:
    """A meta.mat written by scipy in the devkit's layout, a non-leaf synset included."""
    import numpy as np
    import scipy.io as sio
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    synsets = np.zeros(4, dtype=[(f, object) for f in fields])
    for row, (idx, wnid, children) in enumerate([*((i, w, 0) for i, w in IDS.items()),
                                                 (4, "n00000004", 2)]):
        synsets[row] = (idx, wnid, "words", "gloss", children, np.zeros(0), 0, 0)
    buf = io.BytesIO()
    sio.savemat(buf, {"synsets": synsets})
    return buf.getvalue()
