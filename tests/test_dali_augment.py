"""timm's augmentations on the DALI loader's CPU pipeline (powergrad/data/dali_augment.py):
RandAugment's settings as timm reads the string, each op against timm's own op on the same
image, n, m, p and the magnitude noise measured in pixels, the loader's images changing and
replaying; repeated augmentation in DeiT's order; random erasing at its probability."""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_images import CLASSES, textured_folder
from PIL import Image

from powergrad.config.loading import load_recipe
from powergrad.config.schema import DataConfig
from powergrad.data import dali_loaders
from powergrad.data.dali_augment import (OPS, STEPS, NotOnDali, apply_op, param_table,
                                         rand_augment, rand_augment_spec, unsupported_on_dali)
from powergrad.data.dali_loaders import DaliTrainLoader
from powergrad.data.imagefolder_checks import scan_image_folder

CPU = torch.device("cpu")
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DEIT = "rand-m9-mstd0.5-inc1"
FILL = 115


def run_pipeline(images: list[np.ndarray], graph, seed: int = 0) -> list[list[np.ndarray]]:
    """Each output of graph(batch) over one batch of `images` (uint8 HWC), as numpy."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=seed,
                  enable_conditionals=True)
    def pipeline():
        return tuple(graph(fn.external_source(source=lambda: images, batch=True,
                                              layout="HWC")))

    outputs = pipeline().run()
    return [[np.array(sample) for sample in out] for out in outputs]


# --- the string --------------------------------------------------------------------------

INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
              "TranslateXRel", "TranslateYRel")


@pytest.mark.parametrize("aa, n, m, mstd, mmax, p, increasing", [
    (DEIT, 2, 9, 0.5, 10, 0.5, True),  # timm's defaults: 2 layers, p 0.5
    ("rand-m7-n3-p1.0", 3, 7, 0, 10, 1.0, False),
    ("rand-n1-mstd101-m20-mmax20", 1, 20, math.inf, 20, 0.5, False),  # mstd > 100: uniform
])
def test_rand_augment_settings_are_the_strings(aa, n, m, mstd, mmax, p, increasing):
    spec = rand_augment_spec(aa)
    assert (spec.n, spec.m, spec.mstd, spec.mmax, spec.p) == (n, m, mstd, mmax, p)
    names = tuple(name.replace("Increasing", "") for name in INCREASING)
    assert spec.ops == (INCREASING if increasing else names)
    assert spec.levels()[[0, 1, -1]].tolist() == [0, 0.1, mmax]


def test_what_dali_cannot_do_is_named():
    for aa in ("original", "augmix-m5-w4-d2", "rand-m9-tweights", "rand-m9-t3a"):
        with pytest.raises(NotOnDali, match="use data.loader: torchvision|need data.loader"):
            rand_augment_spec(aa)
        assert unsupported_on_dali(DataConfig(aa=aa)) == ["data.aa"]
    assert unsupported_on_dali(DataConfig(color_jitter=0.4)) == ["data.color_jitter"]
    deit = DataConfig(aa=DEIT, reprob=0.25, aug_repeats=3, train_interpolation="bicubic")
    assert unsupported_on_dali(deit) == []


# --- the ops -----------------------------------------------------------------------------

def timm_outputs(name: str, level: float, image: np.ndarray) -> list[np.ndarray]:
    """timm's op at `level` on `image`: [+, -] for an op that draws a sign, else [one]."""
    from timm.data.auto_augment import AugmentOp

    op = AugmentOp(name, prob=1.0, magnitude=level,
                   hparams={"img_mean": (FILL,) * 3, "interpolation": Image.BILINEAR})
    found = {}
    for seed in range(16):  # timm negates when its first random() is over 0.5
        random.seed(seed)
        negated = random.random() > 0.5
        random.seed(seed)
        found[negated] = np.asarray(op(Image.fromarray(image)), dtype=np.int16)
    return [found[False], found[True]] if OPS[name][1] else [found[False]]


def dali_outputs(names: list[str], level: float, images: list[np.ndarray]) -> dict:
    """{name: [+ batch, - batch] or [batch]}: DALI's op for each timm name at `level`, its
    argument looked up per sample as rand_augment looks it up."""
    from nvidia.dali import fn, types

    spec = rand_augment_spec(DEIT)
    calls = [(name, sign) for name in names for sign in ((0, 1) if OPS[name][1] else (0,))]

    def graph(batch):
        for name, sign in calls:
            table = param_table(name, spec)
            row = fn.random.uniform(values=[round(level * STEPS) * 2 + sign], dtype=types.INT32)
            yield apply_op(name, batch, None if table is None else types.Constant(table)[row],
                           shape=images[0].shape[:2], fill=FILL)
    out = {}
    for (name, _), batch in zip(calls, run_pipeline(images, graph)):
        out.setdefault(name, []).append([b.astype(np.int16) for b in batch])
    return out


EXACT = {"Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing",
         "SolarizeAdd"}
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


@pytest.mark.parametrize("level", [9, 3.7])  # the DeiT string's m; a level mstd draws
def test_each_op_is_timms_op_at_the_level(level, tmp_path):
    samples = textured_folder(tmp_path, per_class=2)
    images = [np.asarray(Image.open(p).convert("RGB").resize((48, 40))) for p, _ in samples]
    names = sorted(OPS)
    got = dali_outputs(names, level, images)
    for name in names:
        for i, image in enumerate(images):
            want = timm_outputs(name, level, image)
            mine = [batch[i] for batch in got[name]]
            if len(want) == 2 and (np.abs(mine[0] - want[1]).mean()
                                   < np.abs(mine[0] - want[0]).mean()):
                want = want[::-1]  # the sign's direction is a convention; both are drawn
            for ours, theirs in zip(mine, want):
                error = np.abs(ours - theirs)
                where = f"{name} at {level}, image {i}"
                if name in EXACT:
                    assert error.max() == 0, where
                elif name in GEOMETRIC:  # bilinear both; edges of the fill differ
                    assert error.mean() < 1.5 and (error > 2).mean() < 0.06, where
                elif name == "Equalize":  # DALI's is OpenCV's, not PIL's table
                    import cv2
                    opencv = np.stack([cv2.equalizeHist(np.ascontiguousarray(image[..., c]))
                                       for c in range(3)], axis=-1)
                    assert np.array_equal(ours, opencv) and error.mean() < 12, where
                elif name.startswith("Sharpness"):  # the border: PIL keeps the input's
                    assert error[1:-1, 1:-1].max() <= 1, where
                else:  # colour, contrast, brightness, auto-contrast: PIL rounds its grey
                    assert error.max() <= 2 and error.mean() < 0.75, where
            if name != "AutoContrast":  # the images span 0-255 nearly: little to stretch
                assert np.abs(want[0] - image).mean() > 0.2, f"{name} left the image alone"


def brightness_after(aa: str, value: int = 200, count: int = 64, seed: int = 0) -> np.ndarray:
    """Each image's value after RandAugment with data.aa's n, m, mstd and p but Brightness
    as the only op (inc0: factor 0.1 + 1.8 m / 10, no sign), on flat grey images."""
    spec = dataclasses.replace(rand_augment_spec(aa), ops=("Brightness",))
    images = [np.full((8, 8, 3), value, np.uint8) for _ in range(count)]
    (out,) = run_pipeline(images, lambda b: [rand_augment(b, spec, size=8, fill=FILL)], seed)
    assert all((o == o[0, 0, 0]).all() for o in out)
    return np.array([o[0, 0, 0] for o in out], dtype=np.float64)


def test_n_m_p_and_mstd_act_as_the_string_says():
    factor = 0.1 + 1.8 * 3 / 10  # m3
    assert (brightness_after("rand-m3-n1-p1.0") == round(200 * factor)).all()
    assert (brightness_after("rand-m3-n2-p1.0") == round(round(200 * factor) * factor)).all()
    assert (brightness_after("rand-m6-n1-p1.0") == round(200 * (0.1 + 1.8 * 0.6))).all()
    # p 0.5 (timm's default): each layer acts on about half; 64 images, 4.5 sd either side
    untouched = (brightness_after("rand-m3-n1") == 200).mean()
    assert 0.22 <= untouched <= 0.78, untouched
    assert set(brightness_after("rand-m3-n1")) == {200, round(200 * factor)}
    # mstd 1: the magnitude ~ N(3, 1) per image, so the value ~ 200 (0.1 + 0.18 N(3, 1))
    noisy = brightness_after("rand-m3-n1-p1.0-mstd1", count=128)
    assert abs(noisy.mean() - 200 * factor) < 10 and 25 < noisy.std() < 48, noisy
    uniform = brightness_after("rand-m3-n1-p1.0-mstd101", count=128)  # uniform in [0, m]
    assert uniform.min() >= 20 and uniform.max() <= 128 and abs(uniform.mean() - 74) < 10


# --- through the loader ------------------------------------------------------------------

def loader(root, seed=5, **fields) -> DaliTrainLoader:
    cfg = DataConfig(**{"dataset": "imagefolder", "loader": "dali", "train_dir": str(root),
                        "val_dir": str(root), "workers": 1, "img_size": 32, **fields})
    classes, samples = scan_image_folder(cfg.train_dir)
    return DaliTrainLoader(samples, classes, cfg, batch_size=8, seed=seed, device=CPU,
                           distributed=False, channels_last=True)


def epoch(train) -> tuple[torch.Tensor, list[int]]:
    batches = list(train)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]).tolist()


def test_loader_images_change_with_rand_augment_and_replay(tmp_path):
    textured_folder(tmp_path, per_class=16)  # 48 images
    whole = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)  # the same crop either way
    plain, plain_labels = epoch(loader(tmp_path, **whole))
    train = loader(tmp_path, aa=DEIT, **whole)
    augmented, labels = epoch(train)
    assert labels == plain_labels and augmented.shape == plain.shape
    changed = ((augmented - plain).abs().flatten(1).amax(1) > 1e-4).float().mean().item()
    # two layers at p 0.5: a quarter of the images untouched, a few ops barely change one
    assert 0.55 <= changed <= 0.95, changed
    train.set_epoch(0)
    assert torch.equal(epoch(train)[0], augmented)  # an epoch replays bit for bit
    train.set_epoch(1)
    assert not torch.equal(epoch(train)[0], augmented)


def test_repeats_follow_deits_order_over_ranks(tmp_path, monkeypatch):
    samples = textured_folder(tmp_path, per_class=8)  # 24 images, 3 repeats, 2 ranks
    labels_of = np.array([label for _, label in samples])
    generator = torch.Generator()
    generator.manual_seed(5 + 3)  # seed + epoch
    copies = torch.randperm(24, generator=generator).repeat_interleave(3).tolist()
    for rank in (0, 1):
        monkeypatch.setattr(dali_loaders, "_shard", lambda rank=rank: (rank, 2))
        cfg = DataConfig(dataset="imagefolder", loader="dali", train_dir=str(tmp_path),
                         val_dir=str(tmp_path), workers=1, img_size=32, aug_repeats=3)
        train = DaliTrainLoader(scan_image_folder(str(tmp_path))[1], CLASSES, cfg,
                                batch_size=4, seed=5, device=CPU, distributed=True,
                                channels_last=True)
        train.set_epoch(3)
        images, labels = epoch(train)
        # DeiT's RASampler: 24 / 2 = 12 per rank, every second of the repeated order
        mine = copies[rank::2][:12]
        assert len(train) == 3 and labels == labels_of[mine].tolist()
        twice = next(index for index in mine if mine.count(index) == 2)
        first, second = (i for i, index in enumerate(mine) if index == twice)
        assert not torch.equal(images[first], images[second])  # copies drawn apart


def test_random_erasing_hits_the_configured_share(tmp_path):
    # const mode writes 0 in every channel of a normalised image; a decoded pixel cannot be
    # exactly the mean (0.485 x 255 is not whole)
    textured_folder(tmp_path, per_class=8)
    train = loader(tmp_path, reprob=0.25, remode="const", recount=1)
    erased = []
    for e in range(16):  # 384 images
        train.set_epoch(e)
        for images, _ in train:
            images = train.batch_augment(images)  # what train_step does with each batch
            erased += (images == 0).all(dim=1).flatten(1).any(dim=1).tolist()
    share = float(np.mean(erased))
    assert abs(share - 0.25) < 0.09, share  # binomial sd 0.022 over 384 images
    assert loader(tmp_path).batch_augment is None



def test_describe_shows_the_dali_pipeline():
    from powergrad.commands.describe import _augmentation

    recipe = load_recipe(RECIPES / "imagenet/deit_small_base.yaml", ["data.loader=dali"])
    first, ops = _augmentation(recipe).split("\n")
    assert first.startswith("decode a random crop (scale (0.08, 1.0)") and "(loader: dali)" in first
    assert ("resize (bicubic, antialiased) -> horizontal flip 0.5 -> RandAugment "
            "rand-m9-mstd0.5-inc1 (DALI auto_aug: 2 layers, each p 0.5, m 9 of 10, noise "
            "N(0, 0.5)") in first
    assert "RandomErasing(p 0.25, pixel, up to 1" in first and "augmentation x3" in first
    # at m 9 of 10: 27 of timm's 30 degrees, 4 - int(3.6) = 1 bit kept; 15 ops
    assert "Rotate +-27 deg" in ops and "PosterizeIncreasing keeps 1 of 8 bits" in ops
    assert ops.split(": ", 1)[1].count(", ") == 14


def test_zero_bits_posterize_to_black():
    # where timm's formula keeps 0 bits (Pillow 13 refuses them) the mask keeps nothing
    spec = rand_augment_spec(DEIT)  # levels 0.1 apart: row 2 b is level b / 10
    assert param_table("PosterizeIncreasing", spec)[2 * 100] == 0  # 4 - int(4)
    assert param_table("PosterizeIncreasing", spec)[2 * 99] == 0x80  # 4 - int(3.96): 1 bit
    assert param_table("Posterize", spec)[2 * 24] == 0  # int(0.96)
    assert param_table("Posterize", spec)[2 * 25] == 0x80
