"""timm's augmentation keys on the torchvision loader: the policy strings checked part by part
(and optim.opt, sched.decay_fn, the other strings timm parses), RandAugment and AugMix
configured as timm's own factory configures them, random erasing's rectangles, repeated
augmentation's copies across ranks, and the loaders that cannot do them refusing in one
line."""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_images import textured_folder
from PIL import Image

from powergrad.commands.cli import main as cli_main
from powergrad.config.loading import RecipeError, load_recipe
from powergrad.config.schema import DataConfig
from powergrad.data.augment import batch_erasing, colour_transforms, repeated_sampler

REPO = Path(__file__).resolve().parents[1]
AA = "rand-m9-mstd0.5-inc1"


def test_randaugment_is_configured_as_timms_create_transform_configures_it():
    """The same image and seeds through our RandAugment and through the one inside timm's
    create_transform for a 64 px bicubic training pipeline: the same pixels."""
    import timm.data
    from timm.data.auto_augment import RandAugment

    cfg = DataConfig(aa=AA, train_interpolation="bicubic")
    timms = next(t for t in timm.data.create_transform(
        64, is_training=True, auto_augment=AA, interpolation="bicubic",
        mean=cfg.mean, std=cfg.std).transforms if isinstance(t, RandAugment))
    to_pil, ours, to_tensor = colour_transforms(cfg, 64)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for seed in range(20):
        random.seed(seed)
        np.random.seed(seed)
        want = np.asarray(timms(image))
        random.seed(seed)
        np.random.seed(seed)
        got = to_tensor(ours(to_pil(torch.from_numpy(np.array(image)).permute(2, 0, 1))))
        assert np.array_equal(got.permute(1, 2, 0).numpy(), want), seed


def test_random_erasing_changes_one_rectangle_within_timms_area_bounds():
    erase = batch_erasing(DataConfig(reprob=1.0, remode="const", recount=1), torch.device("cpu"))
    random.seed(0)
    torch.manual_seed(0)
    batch = torch.ones(16, 3, 40, 40)
    erase(batch)
    for image in batch:
        zero = (image == 0).all(dim=0)  # const mode: every channel 0 in normalised space
        rows, cols = zero.any(dim=1).nonzero().flatten(), zero.any(dim=0).nonzero().flatten()
        box = zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and zero.sum() == box.numel()  # one solid rectangle, nothing else
        assert (image[:, ~zero] == 1).all()
        assert 0.02 * 1600 * 0.9 <= box.numel() <= 1600 / 3 * 1.1  # min_area, max_area


def test_repeated_augmentation_holds_each_chosen_image_aug_repeats_times_across_ranks():
    dataset = list(range(12))
    for repeats, world in ((3, 2), (3, 4), (2, 3)):
        seen = Counter()
        for rank in range(world):
            sampler = repeated_sampler(dataset, repeats, world, rank)
            sampler.set_epoch(7)
            indices = list(sampler)
            assert len(indices) == len(sampler) == -(-len(dataset) // world)
            seen.update(indices)
        assert max(seen.values()) <= repeats  # never more copies than asked for
        assert sum(seen.values()) == world * -(-len(dataset) // world)
    # an exact case: 12 images, 3 repeats, 2 ranks: 4 images, each exactly 3 times
    seen = Counter(i for rank in range(2) for i in repeated_sampler(dataset, 3, 2, rank))
    assert sorted(seen.values()) == [3, 3, 3, 3]


def tiny_tree(root: Path) -> Path:
    textured_folder(root / "train", per_class=4)
    textured_folder(root / "val", per_class=1, seed=1)
    return root


def deit_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [str(REPO / "recipes/imagenet/deit_small_base.yaml"),
            f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}",
            "data.workers=0", "data.img_size=32", "data.val_img_size=32",
            "model.kwargs.img_size=32", "model.num_classes=3", "data.num_classes=3",
            "train.global_batch=4", "train.batch_size=4", "train.eval_batch_size=3",
            f"log.output={out}", *extra]


def test_the_deit_recipe_trains_with_its_augmentations(tmp_path, capsys):
    root = tiny_tree(tmp_path)
    assert cli_main(["train", *deit_args(root, tmp_path / "runs"), "--fast-dev-run", "2"]) == 0
    assert "fast dev run OK: 2 step(s)" in capsys.readouterr().out


# ffcv does none of timm's policies; DALI does RandAugment (dali_augment.py), not AugMix
@pytest.mark.parametrize("loader,aa", [("ffcv", AA), ("dali", "augmix-m5-w4-d2")])
def test_a_loader_without_timms_augmentations_refuses_them(loader, aa, tmp_path, capsys):
    root = tiny_tree(tmp_path)
    (root / "train.beton").write_bytes(b"")  # never read: refused before the data is opened
    args = deit_args(root, tmp_path / "runs", f"data.loader={loader}", f"data.aa={aa}",
                     f"data.train_beton={root / 'train.beton'}",
                     f"data.val_beton={root / 'train.beton'}")
    assert cli_main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert f"data.aa: got '{aa}', but the {loader} loader does not do it; expected data.loader: " \
           "torchvision" in err or "does not import" in err  # DALI may be absent: its own line


def test_an_unparsable_policy_is_refused(tmp_path, capsys):
    root = tiny_tree(tmp_path)
    assert cli_main(["train", *deit_args(root, tmp_path / "runs", "data.aa=rand-x9-q")]) == 2
    assert "data.aa: got 'rand-x9-q': part 'x9' is not one of RandAugment's settings" in \
        capsys.readouterr().err


DEIT = REPO / "recipes/imagenet/deit_small_base.yaml"


@pytest.mark.parametrize("aa,kind", [
    ("rand-m9-mstd0.5-inc1", "RandAugment"), ("rand-m9-n3-mstd0.5", "RandAugment"),
    ("rand-mstd1-tweights", "RandAugment"), ("rand-m15-mmax20", "RandAugment"),
    ("augmix-m5-w4-d2", "AugMixAugment"), ("augmix-m3-w3-d0-a1-b1", "AugMixAugment"),
    ("original", "AutoAugment"), ("original-mstd0.5", "AutoAugment"), ("v0", "AutoAugment"),
    ("v0r", "AutoAugment"), ("3a", "AutoAugment")])
def test_timms_policy_strings_load_and_build_timms_transform(aa, kind):
    recipe = load_recipe(DEIT, [f"data.aa={aa}"])
    built = colour_transforms(recipe.data, 32)[1]
    assert type(built).__name__ == kind


@pytest.mark.parametrize("aa,part", [
    ("rand-m99-zz", "part 'zz' holds no number, so timm would skip it"),  # the case
    ("rand-m99", "part 'm99' (magnitude) is outside timm's range [0, 10]"),
    ("rand-m15-mmax12", "part 'm15' (magnitude) is outside timm's range [0, 12]"),
    ("rand-mstdinf", "part 'mstdinf' holds no number"),
    ("rand-m9-tfoo", "part 'tfoo' names no transform set timm knows"),
    ("rand-m9-m5", "part 'm5' sets m a second time"),
    ("rand-m9-p1.5", "part 'p1.5' (probability of each op) is outside timm's range [0, 1]"),
    ("rand-m9-mmax0", "part 'mmax0' (magnitude upper bound) is outside timm's range"),
    ("rand-m9-inc2", "part 'inc2' (increasing-severity switch) is outside"),
    ("rand-m9x", "part 'm9x' (magnitude) is not a whole number"),
    ("augmix-m11", "part 'm11' (severity) is outside timm's range [0, 10]"),
    ("augmix-m3-zz", "part 'zz' holds no number"),
    ("augmix-m3-a0", "part 'a0' (mixing alpha) is outside timm's range (0, inf)"),
    ("original-m9", "part 'm9' is not one of AutoAugment original's settings"),
    ("Rand-m9", "'Rand' is not a policy timm knows"),
    ("rand--m9", "part '' holds no number")])
def test_a_policy_part_timm_would_skip_or_clamp_is_refused_naming_it(aa, part):
    """timm passes over a part without a digit and clamps the magnitude at every call: each
    is refused when the recipe loads, naming data.aa and the part."""
    with pytest.raises(RecipeError) as refused:
        load_recipe(DEIT, [f"data.aa={aa}"])
    assert refused.value.key == "data.aa"
    assert f"data.aa: got {aa!r}: {part}" in str(refused.value)


def test_every_accepted_part_is_one_timm_reads_into_its_transform():
    """The part tables against timm's own parser: each part's number lands in the built
    transform (so a part the tables accept is never one timm skips)."""
    from timm.data import auto_augment as timm_aa

    from powergrad.config.timm_strings import AUGMIX_PARTS, AUTO_PARTS, RAND_PARTS

    rand = timm_aa.rand_augment_transform("rand-m7-n3-p0.4-mstd0.5-mmax12-inc1", None)
    op = rand.ops[0]
    assert (op.magnitude, rand.num_layers, op.prob, op.magnitude_std, op.magnitude_max) == \
        (7, 3, 0.4, 0.5, 12)
    assert any(o.name.endswith("Increasing") for o in rand.ops)
    assert timm_aa.rand_augment_transform("rand-tweights", None).choice_weights is not None
    mix = timm_aa.augment_and_mix_transform("augmix-m4-w5-d2-a0.5-b1-mstd0.3", None)
    assert (mix.ops[0].magnitude, mix.width, mix.depth, mix.alpha, mix.blended,
            mix.ops[0].magnitude_std) == (4, 5, 2, 0.5, True, 0.3)
    auto = timm_aa.auto_augment_transform("original-mstd0.7", None)
    assert auto.policy[0][0].magnitude_std == 0.7
    assert set(RAND_PARTS) == {"m", "n", "p", "mstd", "mmax", "inc"}
    assert set(AUGMIX_PARTS) == {"m", "w", "d", "a", "b", "mstd"} and set(AUTO_PARTS) == {"mstd"}


def test_augmix_is_configured_as_timms_create_transform_configures_it():
    """AugMix (built by auto_augment_transform before, which refused it) with timm's own
    AugMix settings: the same pixels as the one inside timm's create_transform."""
    import timm.data
    from timm.data.auto_augment import AugMixAugment

    aa = "augmix-m5-w4-d2"
    cfg = DataConfig(aa=aa, train_interpolation="bicubic")
    timms = next(t for t in timm.data.create_transform(
        64, is_training=True, auto_augment=aa, interpolation="bicubic",
        mean=cfg.mean, std=cfg.std).transforms if isinstance(t, AugMixAugment))
    ours = colour_transforms(cfg, 64)[1]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    for seed in range(5):
        random.seed(seed)
        np.random.seed(seed)
        want = np.asarray(timms(image))
        random.seed(seed)
        np.random.seed(seed)
        assert np.array_equal(np.asarray(ours(image)), want), seed


@pytest.mark.parametrize("item,words", [
    ("optim.opt=foo_adamw", "optim.opt: got 'foo_adamw': timm reads only the prefix "
                            "lookahead_ and would pass over 'foo'"),
    ("optim.opt=adamx", "optim.opt: got 'adamx': 'adamx' is not a timm optimizer"),
    ("sched.decay_fn=foo", "sched.decay_fn: got 'foo', expected one of linear, 1-sqrt")])
def test_the_other_strings_timm_parses_are_refused_when_it_would_misread_them(item, words):
    with pytest.raises(RecipeError, match=re.escape(words)):
        load_recipe(DEIT, [item])
    load_recipe(DEIT, ["optim.opt=lookahead_adamw", "sched.decay_fn=1-sqrt"])  # timm's own


def test_describe_shows_the_deit_pipeline(capsys):
    assert cli_main(["describe", str(REPO / "recipes/imagenet/deit_small_base.yaml")]) == 0
    out = capsys.readouterr().out
    assert ("augmentation: RandomResizedCrop(scale (0.08, 1.0), ratio (0.75, 1.3333), bicubic) "
            f"-> horizontal flip 0.5 -> RandAugment {AA} -> normalise -> RandomErasing(p 0.25, "
            "pixel, up to 1); repeated augmentation x3  (loader: torchvision); mixup 0.8 / "
            "cutmix 1 (prob 1, switch 0.5)") in out
    assert "optimizer AdamW (adamw)" in out and "schedule cosine: 300 epochs" in out


def test_random_erasing_runs_on_every_image_loaders_trained_batches(tmp_path, monkeypatch):
    """Erasing acts on the normalised batch, so the ffcv loader does it too: once per trained
    batch, after normalisation (the erased values are those of the normalised batch)."""
    from timm.data.random_erasing import RandomErasing

    from powergrad.config.loading import load_recipe
    from powergrad.data.ffcv_writer import ImageWriterSettings, write_imagefolder_beton
    from powergrad.training import engine

    root = tiny_tree(tmp_path)
    for split in ("train", "val"):
        write_imagefolder_beton(root / split, root / f"{split}.beton",
                                settings=ImageWriterSettings(), workers=1)
    calls = []
    real = RandomErasing.__call__
    monkeypatch.setattr(RandomErasing, "__call__",
                        lambda self, batch: calls.append(batch.dtype) or real(self, batch))
    recipe = load_recipe(REPO / "recipes/imagenet/resnet18_cosine_pgt.yaml", [
        f"data.train_beton={root / 'train.beton'}", f"data.val_beton={root / 'val.beton'}",
        "data.loader=ffcv", "data.workers=1", "data.img_size=32", "data.val_img_size=32",
        "model.num_classes=3", "data.num_classes=3", "train.global_batch=4",
        "train.batch_size=2", "train.eval_batch_size=3", "train.amp_dtype=bfloat16",
        "data.reprob=0.25", f"log.output={tmp_path / 'runs'}"])
    assert engine.train(recipe, max_steps=2)["updates"] == 2
    assert calls == [torch.float32] * 4  # 2 steps x 2 accumulated micro-batches, normalised


def test_the_loaders_refuse_what_they_cannot_do_when_called_from_python(tmp_path):
    """engine.train does not run preflight: the loader builders refuse on their own."""
    from powergrad.data import build_loaders

    images = DataConfig(dataset="imagefolder", loader="ffcv", aa=AA,
                        train_beton=str(tmp_path / "none.beton"),
                        val_beton=str(tmp_path / "none.beton"))
    with pytest.raises(ValueError, match="data.aa is set, but the ffcv loader does not do it"):
        build_loaders(images, batch_size=2, eval_batch_size=2, seed=0, device="cpu")
    fashion = DataConfig(reprob=0.25)
    with pytest.raises(ValueError, match="data.reprob is set, but the Fashion-MNIST loader"):
        build_loaders(fashion, batch_size=2, eval_batch_size=2, seed=0, device="cpu")


@pytest.mark.parametrize("aa, name", [("rand-m10-mstd0-inc1", "PosterizeIncreasing"),
                                      ("rand-m1-mstd0", "Posterize")])
def test_a_posterize_to_zero_bits_gives_a_black_image_not_a_pillow_error(aa, name):
    """Pillow 13 refuses 0 bits, which timm asks for at these magnitudes (4 - 10 * 4 / 10 and
    int(1 * 4 / 10)): the op must give the black image older Pillows gave, not raise (the
    torchvision loader took the error for an unreadable image and stopped the run)."""
    from types import SimpleNamespace

    from PIL import Image

    from powergrad.data.augment import colour_transforms

    cfg = SimpleNamespace(aa=aa, mean=(0.5,), train_interpolation="bicubic", color_jitter=None)
    policy = colour_transforms(cfg, 32)[1]
    op = next(op for op in policy.ops if op.name == name)
    op.prob = 1.0
    image = Image.new("RGB", (8, 6), (200, 100, 50))
    out = op(image)
    assert out.size == (8, 6) and set(out.getdata()) == {(0, 0, 0)}
