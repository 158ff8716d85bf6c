"""ffcv and torchvision image loaders, the .beton writer and the bad-input checks, against
values computed independently (PIL decodes, numpy permutations, hand-written schedules).

ffcv compiles each pipeline with numba on its first epoch (several seconds), so the ffcv
loaders are built once per module and shared by the tests that need them."""
from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from helpers_images import (CLASSES, constant_colour_folder, textured_folder, tiny_folder,
                            write_idx_gz)
from PIL import Image

from powergrad.config.schema import DataConfig
from powergrad.data import EvalLoader, TrainLoader, build_loaders
from powergrad.data.beton_meta import sidecar_path
from powergrad.data.device_batches import ImageBatches
from powergrad.data.ffcv_writer import (ImageWriterSettings, write_fashion_mnist_beton,
                                        write_imagefolder_beton)
from powergrad.data.imagefolder_checks import ImageDataError
from powergrad.data.images import build_image_loaders
from powergrad.data.resolution_schedule import train_resolution
from powergrad.data.torchvision_loaders import read_rgb
from powergrad.system.distributed import DistInfo

RAW = ImageWriterSettings(write_mode="raw")  # raw pixels: the .beton holds PIL's decode
CPU = torch.device("cpu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TRAIN_BATCH, EVAL_BATCH = 4, 4
SEED = 11
# numba's dispatcher finalizer raises a KeyError when ffcv's compiled pipelines are garbage
# collected; it is numba/ffcv noise at teardown, not a failure of the code under test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    train_samples = textured_folder(root / "train", per_class=8)
    val_colours = constant_colour_folder(root / "val")
    for split in ("train", "val"):
        write_imagefolder_beton(root / split, root / f"{split}.beton", settings=RAW, workers=2)
    return root, train_samples, val_colours


def make_cfg(root, loader, **overrides):
    fields = dict(dataset="imagefolder", loader=loader, train_dir=str(root / "train"),
                  val_dir=str(root / "val"), train_beton=str(root / "train.beton"),
                  val_beton=str(root / "val.beton"), workers=2, img_size=64, val_img_size=32,
                  min_res=32, max_res=64, start_ramp=1, end_ramp=2, mean=MEAN, std=STD)
    fields.update(overrides)
    return DataConfig(**fields)


@pytest.fixture(scope="module", params=["ffcv", "torchvision"])
def loaders(request, data):
    cfg = make_cfg(data[0], request.param)
    train, val = build_image_loaders(cfg, batch_size=TRAIN_BATCH, eval_batch_size=EVAL_BATCH,
                                     seed=SEED, device=CPU, channels_last=True)
    return request.param, train, val


def run_epoch(loader):
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), batches


def test_resolution_schedule_matches_hand_computed_ramp():
    # 128 -> 256 over epochs 1..5: linear values 128, 160, 192, 224, 256 (all multiples of 32)
    got = [train_resolution(e, 224, 128, 256, 1, 5) for e in range(8)]
    assert got == [128, 128, 160, 192, 224, 256, 256, 256]
    # 160 -> 192 over 0..4: 168 -> 160, 176 -> 5.5 * 32 rounds to even -> 192, 184 -> 192
    assert [train_resolution(e, 224, 160, 192, 0, 4) for e in range(5)] == [160, 160, 192,
                                                                            192, 192]
    assert train_resolution(3, 224, None, None, 0, 10) == 224


def test_writer_sidecar_records_classes_and_settings(data):
    root, train_samples, _ = data
    meta = json.loads(sidecar_path(root / "train.beton").read_text())
    assert meta["class_names"] == CLASSES
    assert meta["num_samples"] == len(train_samples) == 24
    assert meta["writer"] == {"max_resolution": 500, "write_mode": "raw",
                              "compress_probability": 0.5, "jpeg_quality": 90}
    assert meta["beton_bytes"] == (root / "train.beton").stat().st_size


def test_eval_loader_values_labels_and_order(data, loaders):
    _, _, val_colours = data
    name, _, val = loaders
    images, labels, batches = run_epoch(val)
    assert len(val) == len(batches) == math.ceil(len(val_colours) / EVAL_BATCH)
    assert val.class_names == CLASSES and val.num_classes == 3
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape == (len(val_colours), 3, 32, 32)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
    assert labels.tolist() == [label for _, label in val_colours]  # file order, all samples
    for image, (colour, _) in zip(images, val_colours):
        expected = (colour / 255 - np.array(MEAN)) / np.array(STD)  # float64, per channel
        want = torch.tensor(expected, dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32)
        torch.testing.assert_close(image, want, atol=1e-5, rtol=0)


def test_train_loader_resolution_labels_and_order(data, loaders):
    _, train_samples, _ = data
    name, train, _ = loaders
    all_labels = np.array([label for _, label in train_samples])
    lo = torch.tensor((0 - np.array(MEAN)) / np.array(STD), dtype=torch.float32).view(1, 3, 1, 1)
    hi = torch.tensor((1 - np.array(MEAN)) / np.array(STD), dtype=torch.float32).view(1, 3, 1, 1)
    assert len(train) == len(train_samples) // TRAIN_BATCH
    seen = {}
    for epoch, resolution in [(0, 32), (1, 32), (2, 64), (5, 64)]:
        train.set_epoch(epoch)
        assert train.resolution == resolution
        images, labels, batches = run_epoch(train)
        assert all(x.shape == (TRAIN_BATCH, 3, resolution, resolution) for x, _ in batches)
        assert ((images >= lo - 1e-5) & (images <= hi + 1e-5)).all()
        # 24 images in batches of 4: every image once (as a multiset of labels)
        assert sorted(labels.tolist()) == sorted(all_labels.tolist())
        seen[epoch] = labels.tolist()
        if name == "ffcv":  # ffcv draws the order from numpy's default_rng(seed + epoch)
            order = np.random.default_rng(SEED + epoch).permutation(len(all_labels))
            assert labels.tolist() == all_labels[order].tolist()
    train.set_epoch(2)
    assert run_epoch(train)[1].tolist() == seen[2]  # an epoch's order replays
    assert seen[2] != seen[5]
    assert train.num_classes == 3 and train.class_names == CLASSES


def test_fashion_mnist_beton_holds_exact_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 10, dtype=np.uint8)
    write_idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    beton = write_fashion_mnist_beton(tmp_path, "test", tmp_path / "fm.beton", workers=1)
    cfg = DataConfig(dataset="imagefolder", loader="ffcv", train_beton=str(beton),
                     val_beton=str(beton), img_size=28, crop_pct=1.0, mean=(0, 0, 0),
                     std=(1, 1, 1), workers=1, num_classes=10)
    _, val = build_image_loaders(cfg, batch_size=2, eval_batch_size=4, seed=0, device=CPU)
    got, got_labels, _ = run_epoch(val)
    assert val.class_names[0] == "T-shirt/top"
    assert got_labels.tolist() == labels.tolist()
    expected = torch.from_numpy(images).float().unsqueeze(1).expand(-1, 3, -1, -1)
    torch.testing.assert_close(got * 255, expected, atol=1e-3, rtol=0)


# --- bad input: each raises before any training, naming the path ---------------------------

def tv_cfg(train_dir, val_dir, **kw):
    return DataConfig(dataset="imagefolder", loader="torchvision", train_dir=str(train_dir),
                      val_dir=str(val_dir), workers=0, **kw)


def build(cfg):
    return build_image_loaders(cfg, batch_size=1, eval_batch_size=1, seed=0, device=CPU)


def test_missing_directory(tmp_path):
    good = tiny_folder(tmp_path / "good")
    with pytest.raises(ImageDataError, match=f"{tmp_path / 'nope'}: image folder does not exist"):
        build(tv_cfg(good, tmp_path / "nope"))


def test_empty_class_folder(tmp_path):
    root = tiny_folder(tmp_path / "d")
    (root / "c").mkdir()
    with pytest.raises(ImageDataError, match=f"{root / 'c'}: class folder is empty"):
        build(tv_cfg(root, root))


def test_non_image_file(tmp_path):
    root = tiny_folder(tmp_path / "d")
    (root / "a" / "notes.txt").write_text("hello")
    with pytest.raises(ImageDataError, match=f"{root / 'a' / 'notes.txt'}: not an image file"):
        build(tv_cfg(root, root))


def test_unreadable_image_file(tmp_path):
    root = tiny_folder(tmp_path / "d")
    bad = root / "b" / "zz.JPEG"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ImageDataError, match=f"{bad}: unreadable image"):
        build(tv_cfg(root, root))
    # the writer decodes everything: it names the file and leaves nothing at the target
    with pytest.raises(ImageDataError, match=f"{bad}: unreadable image"):
        write_imagefolder_beton(root, tmp_path / "x.beton", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_class_count_mismatch(tmp_path, data):
    root = tiny_folder(tmp_path / "d")
    with pytest.raises(ImageDataError, match=f"{root}: holds 2 class folders but "
                                             "data.num_classes is 5"):
        build(tv_cfg(root, root, num_classes=5))
    cfg = make_cfg(data[0], "ffcv", num_classes=1000)
    with pytest.raises(ImageDataError, match="train.beton: holds 3 classes but data.num_classes"):
        build(cfg)


def test_truncated_beton(tmp_path, data):
    beton = tmp_path / "cut.beton"
    shutil.copy(data[0] / "train.beton", beton)
    shutil.copy(sidecar_path(data[0] / "train.beton"), sidecar_path(beton))
    with open(beton, "r+b") as f:
        f.truncate(beton.stat().st_size // 2)
    cfg = make_cfg(data[0], "ffcv", train_beton=str(beton))
    with pytest.raises(ImageDataError, match=f"{beton}: .beton is truncated or corrupt"):
        build(cfg)
    sidecar_path(beton).unlink()  # without a sidecar the layout check alone catches it
    with pytest.raises(ImageDataError, match=f"{beton}: .beton is truncated or corrupt"):
        build(make_cfg(data[0], "ffcv", train_beton=str(beton), num_classes=3))


def test_beton_with_other_fields(tmp_path, data):
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    beton = tmp_path / "other.beton"
    DatasetWriter(str(beton), {"y": IntField()}, num_workers=1).from_indexed_dataset(
        [(i,) for i in range(4)])
    with pytest.raises(ImageDataError, match=f"{beton}: .beton has fields"):
        build(make_cfg(data[0], "ffcv", val_beton=str(beton)))


def test_no_overwrite_without_flag(tmp_path, data):
    target = tmp_path / "t.beton"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=f"{target}: already exists"):
        write_imagefolder_beton(data[0] / "val", target, workers=1)
    assert target.read_bytes() == b"precious"
    write_imagefolder_beton(data[0] / "val", target, workers=1, overwrite=True)
    assert json.loads(sidecar_path(target).read_text())["num_samples"] == 9


def test_loader_choice_errors_and_fallback(tmp_path, data):
    root = data[0]
    with pytest.raises(ValueError, match="'ffcv' but data.train_beton and data.val_beton"):
        build(make_cfg(root, "ffcv", val_beton=None))
    with pytest.raises(ValueError, match="'torchvision' but data.train_dir"):
        build(make_cfg(root, "torchvision", train_dir=None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, _ = build(make_cfg(root, "auto", train_beton=None, workers=0))
    assert type(train).__name__ == "TorchvisionTrainLoader"
    assert any("train_beton/val_beton are not set" in str(w.message) for w in caught)


# --- the loader contract, dataset dispatch, and the pieces the loaders share ----------------

def test_every_loader_keeps_the_contract(loaders, tmp_path):
    _, train, val = loaders
    assert isinstance(train, TrainLoader) and isinstance(val, EvalLoader)
    assert not isinstance(val, TrainLoader)  # no set_epoch: the check can fail
    rng = np.random.default_rng(0)
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (8, 28, 28)))
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 8))
    write_idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    write_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 5))
    fm_train, fm_test = build_loaders(DataConfig(dataset="fashion_mnist", root=str(tmp_path)),
                                      batch_size=2, eval_batch_size=2, seed=0, device=CPU)
    assert isinstance(fm_train, TrainLoader) and isinstance(fm_test, EvalLoader)


def test_unknown_dataset_is_refused_by_name():
    cfg = DataConfig(dataset="cifar10")  # what a recipe typo would give without validation
    with pytest.raises(ValueError, match="data.dataset: 'cifar10' is not a dataset; expected "
                                         r"one of \['fashion_mnist', 'imagefolder'\]"):
        build_loaders(cfg, batch_size=1, eval_batch_size=1, seed=0, device=CPU)


def test_fashion_mnist_takes_its_share_from_dist_info(tmp_path):
    labels = np.arange(10) % 10
    write_idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))
    write_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    cfg = DataConfig(dataset="fashion_mnist", root=str(tmp_path))
    _, test = build_loaders(cfg, batch_size=2, eval_batch_size=2, seed=0, device=CPU,
                            dist_info=DistInfo(rank=1, local_rank=1, world_size=3))
    assert torch.cat([y for _, y in test]).tolist() == labels[1::3].tolist()


@pytest.mark.parametrize("channels_last", [True, False])
def test_normalisation_matches_float64_in_both_layouts(channels_last):
    # odd sizes: a wrong row length or channel order in the tiled channels-last path shows
    images = torch.randint(0, 256, (3, 7, 5, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    labels = torch.tensor([4, 0, 2], dtype=torch.int32)
    batches = ImageBatches([(images, labels)], device=CPU, mean=MEAN, std=STD,
                           channels_last=channels_last, class_names=["a"])
    (got, got_labels), = list(batches)
    mean, std = (np.array(v).reshape(1, 3, 1, 1) for v in (MEAN, STD))
    want = (images.numpy().astype(np.float64) / 255 - mean) / std
    torch.testing.assert_close(got, torch.from_numpy(want).float(), atol=1e-6, rtol=0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=layout) and got.dtype == torch.float32
    assert got_labels.dtype == torch.int64 and got_labels.tolist() == [4, 0, 2]


@pytest.mark.parametrize("decoder", ["torchcodec", "PIL only (no torchcodec installed)"])
def test_torchvision_reader_gives_pils_pixels(tmp_path, monkeypatch, decoder):
    from powergrad.data import torchvision_loaders
    assert torchvision_loaders._DECODE is not None  # the set-up installs TorchCodec: it is used
    if decoder != "torchcodec":
        monkeypatch.setattr(torchvision_loaders, "_DECODE", None)
    rng = np.random.default_rng(1)
    pixels = Image.fromarray(rng.integers(0, 256, (21, 34, 3), dtype=np.uint8))
    files = {"rgb.jpg": pixels, "cmyk.jpeg": pixels.convert("CMYK"),
             "grey.JPEG": pixels.convert("L"), "lossless.png": pixels, "old.bmp": pixels}
    for name, image in files.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as img:  # PIL's decode is the reference
            want = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
        got = read_rgb(str(tmp_path / name))
        assert got.dtype == torch.uint8 and got.shape == (3, 21, 34), name
        assert torch.equal(got, want), name


def test_ddp_without_os_cache_is_refused_when_private_caches_cannot_fit(data, monkeypatch):
    from powergrad.data import ffcv_loaders
    from powergrad.data.beton_meta import read_beton_info

    info = read_beton_info(data[0] / "train.beton")
    monkeypatch.setattr(ffcv_loaders, "memory_bytes", lambda: 3 * info.path.stat().st_size)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # as torchrun sets them
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=f"{info.path}: data.os_cache is false under DDP, so "
                                         "each of the 4 processes on this machine"):
        ffcv_loaders.FfcvTrainLoader(info, make_cfg(data[0], "ffcv", os_cache=False),
                                     batch_size=4, seed=0, device=CPU, distributed=True,
                                     channels_last=False)
    ffcv_loaders.check_private_page_caches(info, 3)  # three copies fit: no error


def test_iterating_leaves_torch_threads_as_the_caller_set_them(loaders):
    # ffcv sets torch's thread count to its worker count (2 here) at every epoch start
    name, train, val = loaders
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        if name == "ffcv":  # as if built while the caller ran torch on 1 thread
            train.torch_threads = val.torch_threads = 1
        for loader in (train, val):
            for _ in loader:
                assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        if name == "ffcv":
            train.torch_threads = val.torch_threads = before


@pytest.mark.parametrize("damage", [lambda meta: meta.pop("beton_bytes"),
                                    lambda meta: meta.update(num_samples="16"),
                                    lambda meta: meta.update(class_names=None)])
def test_a_sidecar_without_a_field_is_one_line_not_a_key_error(data, tmp_path, damage):
    import shutil

    from powergrad.data.beton_meta import read_beton_info
    from powergrad.data.imagefolder_checks import ImageDataError

    beton = tmp_path / "train.beton"
    shutil.copy(data[0] / "train.beton", beton)
    meta = json.loads(sidecar_path(data[0] / "train.beton").read_text())
    damage(meta)
    sidecar_path(beton).write_text(json.dumps(meta))
    with pytest.raises(ImageDataError, match=r"sidecar lacks or garbles .*rewrite the .beton"):
        read_beton_info(beton)
