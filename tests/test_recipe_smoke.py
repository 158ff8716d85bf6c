"""Every shipped recipe trains: two optimizer steps and one evaluation batch through the engine
(`fast_dev_run`), on a tiny ImageNet-format folder of JPEGs through both the ffcv and the
torchvision loader (recipes with timm's augmentations, the DeiT ones, through torchvision,
and refused by ffcv in preflight), or on Fashion-MNIST itself for the Fashion-MNIST and study recipes. Only the data
paths, the resolution, the sizes and fp16 (bf16 on the CPU) are overridden; model, optimizer,
schedule, loss, PGT, clipping, batch arithmetic and memory format are the recipe's own.

Files named base.yaml or *_base.yaml hold shared settings, not runs: their children run them.
ffcv compiles each pipeline on its first epoch (seconds); numba keeps the compiled helpers for
the process, so the recipes share one module-level data set."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers_images import textured_folder
from helpers_recipes import image_recipe_overrides, runs

from powergrad.config.loading import RecipeError, load_recipe
from powergrad.data.augment import settings_in_use
from powergrad.data.ffcv_writer import ImageWriterSettings, write_imagefolder_beton
from powergrad.training import engine
from powergrad.training.preflight import preflight

pytestmark = [pytest.mark.recipe_smoke,
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]
FOLDERS = ("imagenet", "ffcv_imagenet", "fashion_mnist", "study")
# One recipe per folder also runs in the quick loop (`pytest -m "not slow"`), so a broken
# shared base shows there; the others are marked slow. `make test-long` runs them all.
QUICK = {"imagenet/resnet18_cosine_pgt", "ffcv_imagenet/rn18_16_epochs_pgt",
         "fashion_mnist/resnet_pgt", "study/bn_pgt"}


def name(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def params(paths: list[Path]) -> list:
    return [pytest.param(p, id=name(p), marks=() if name(p) in QUICK else pytest.mark.slow)
            for p in paths]


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_imagenet")
    textured_folder(root / "train", per_class=4)
    textured_folder(root / "val", per_class=2, seed=1)
    for split in ("train", "val"):  # the writer's default: part JPEG, part raw pixels
        write_imagefolder_beton(root / split, root / f"{split}.beton",
                                settings=ImageWriterSettings(), workers=1)
    return root


def test_the_quick_loop_keeps_one_shipped_recipe_per_folder():
    shipped = {name(p) for folder in FOLDERS for p in runs(folder)}
    assert QUICK <= shipped and {q.split("/")[0] for q in QUICK} == set(FOLDERS)


@pytest.mark.parametrize("loader", ["ffcv", "torchvision"])
@pytest.mark.parametrize("path", params(runs("imagenet") + runs("ffcv_imagenet")))
def test_image_recipe_trains_two_steps(path, loader, image_data, tmp_path):
    recipe = load_recipe(path, image_recipe_overrides(path, image_data, loader, tmp_path))
    if settings_in_use(recipe.data, loader):  # DeiT's augmentations, through ffcv
        with pytest.raises(RecipeError, match=f"but the {loader} loader does not do it"):
            preflight(recipe, world_size=1)
        return
    summary = engine.train(recipe, max_steps=2)
    assert summary["updates"] == 2 and summary["epochs"] == 1
    assert summary["final_test_top1"] in (0.0, 25.0, 50.0, 75.0, 100.0)  # 4 test images
    assert summary["final_train_loss"] > 0  # finite: the fold of the sums checks it
    assert not any(tmp_path.iterdir()), "a fast dev run writes nothing"


@pytest.mark.parametrize("path", params(runs("fashion_mnist") + runs("study")))
def test_fashion_mnist_recipe_trains_two_steps(path, tmp_path):
    recipe = load_recipe(path, ["train.batch_size=8", "train.threads=1", "data.eval_subset=16",
                                "train.eval_batch_size=16", f"log.output={tmp_path}"])
    summary = engine.train(recipe, max_steps=2)
    assert summary["updates"] == 2 and summary["epochs"] == 1
    assert not any(tmp_path.iterdir())
