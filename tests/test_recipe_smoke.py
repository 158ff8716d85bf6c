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
from helpers_images import CLASSES, textured_folder

from powergrad.config.loading import RecipeError, load_recipe
from powergrad.data.augment import settings_in_use
from powergrad.data.ffcv_writer import ImageWriterSettings, write_imagefolder_beton
from powergrad.training import engine
from powergrad.training.preflight import preflight

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
pytestmark = [pytest.mark.recipe_smoke,
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


def runs(folder: str) -> list[Path]:
    return sorted(p for p in (RECIPES / folder).glob("*.yaml")  # plan.yaml: the study's plan
                  if p.name not in ("base.yaml", "plan.yaml")
                  and not p.name.endswith("_base.yaml"))


IMAGE_RECIPES = runs("imagenet") + runs("ffcv_imagenet")


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_imagenet")
    textured_folder(root / "train", per_class=4)
    textured_folder(root / "val", per_class=2, seed=1)
    for split in ("train", "val"):  # the writer's default: part JPEG, part raw pixels
        write_imagefolder_beton(root / split, root / f"{split}.beton",
                                settings=ImageWriterSettings(), workers=1)
    return root


def image_overrides(root: Path, loader: str, out: Path) -> list[str]:
    return [f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}",
            f"data.train_beton={root / 'train.beton'}", f"data.val_beton={root / 'val.beton'}",
            f"data.loader={loader}", "data.img_size=32", "data.val_img_size=32",
            # torchvision decodes in this process (no worker start per recipe); ffcv needs one
            f"data.workers={0 if loader == 'torchvision' else 1}",
            "data.min_res=null", "data.max_res=null",
            "data.eval_subset=4", "train.threads=1", f"model.num_classes={len(CLASSES)}",
            f"data.num_classes={len(CLASSES)}", "train.eval_batch_size=4", f"log.output={out}"]


def batch_overrides(recipe_path: Path) -> list[str]:
    # Keep the recipe's batch arithmetic: a global batch of 4 in micro-batches of 2 (two
    # accumulation steps) where it sets one, else micro-batches of 2.
    recipe = load_recipe(recipe_path)
    if recipe.train.global_batch is not None:
        return ["train.global_batch=4", "train.batch_size=2"]
    return ["train.batch_size=2"]


def cpu_overrides(recipe_path: Path) -> list[str]:
    # float16 autocast runs about 20x slower than bfloat16 on a CPU (no fast fp16 kernels);
    # the same autocast path runs in bfloat16 here, and tests/test_engine.py trains with
    # float16 and its GradScaler.
    return (["train.amp_dtype=bfloat16"] if load_recipe(recipe_path).train.amp_dtype == "float16"
            else [])


def vit_overrides(recipe_path: Path) -> list[str]:
    # timm's ViTs fix the patch grid at creation: build them for the small test images.
    return ["model.kwargs.img_size=32"] if "deit" in recipe_path.name else []


@pytest.mark.parametrize("loader", ["ffcv", "torchvision"])
@pytest.mark.parametrize("path", IMAGE_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_image_recipe_trains_two_steps(path, loader, image_data, tmp_path):
    overrides = (image_overrides(image_data, loader, tmp_path) + batch_overrides(path)
                 + cpu_overrides(path) + vit_overrides(path))
    recipe = load_recipe(path, overrides)
    if settings_in_use(recipe.data, loader):  # DeiT's augmentations, through ffcv
        with pytest.raises(RecipeError, match=f"but the {loader} loader does not do it"):
            preflight(recipe, world_size=1)
        return
    summary = engine.train(recipe, fast_dev_run=2)
    assert summary["updates"] == 2 and summary["epochs"] == 1
    assert summary["final_test_top1"] in (0.0, 25.0, 50.0, 75.0, 100.0)  # 4 test images
    assert summary["final_train_loss"] > 0  # finite: the fold of the sums checks it
    assert not any(tmp_path.iterdir()), "a fast dev run writes nothing"


@pytest.mark.parametrize("path", runs("fashion_mnist") + runs("study"),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fashion_mnist_recipe_trains_two_steps(path, tmp_path):
    recipe = load_recipe(path, ["train.batch_size=8", "train.threads=1", "data.eval_subset=16",
                                "train.eval_batch_size=16", f"log.output={tmp_path}"])
    summary = engine.train(recipe, fast_dev_run=2)
    assert summary["updates"] == 2 and summary["epochs"] == 1
    assert not any(tmp_path.iterdir())
