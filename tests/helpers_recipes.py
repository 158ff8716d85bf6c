"""The shipped recipes made to train two steps on a tiny ImageNet-format folder: the overrides
the recipe smoke test (tests/test_recipe_smoke.py) and the DALI loader test use."""
from __future__ import annotations

from pathlib import Path

from helpers_images import CLASSES

from powergrad.config.loading import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def runs(folder: str) -> list[Path]:
    """The recipes of recipes/FOLDER that are runs: base.yaml and *_base.yaml hold shared
    settings (their children run them), plan.yaml is the study's plan."""
    return sorted(p for p in (RECIPES / folder).glob("*.yaml")
                  if p.name not in ("base.yaml", "plan.yaml")
                  and not p.name.endswith("_base.yaml"))


def image_recipe_overrides(recipe_path: Path, root: Path, loader: str, out: Path) -> list[str]:
    """Only the data paths, the resolution, the sizes and fp16 (bf16 on the CPU) change: model,
    optimizer, schedule, loss, PGT, clipping, batch arithmetic and memory format stay the
    recipe's own. `root` holds train/ and val/ (and train.beton, val.beton for ffcv)."""
    recipe = load_recipe(recipe_path)
    overrides = [
        f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}",
        f"data.train_beton={root / 'train.beton'}", f"data.val_beton={root / 'val.beton'}",
        f"data.loader={loader}", "data.img_size=32", "data.val_img_size=32",
        # torchvision decodes in this process (no worker start per recipe); ffcv needs one
        f"data.workers={0 if loader == 'torchvision' else 1}",
        "data.min_res=null", "data.max_res=null",
        "data.eval_subset=4", "train.threads=1", f"model.num_classes={len(CLASSES)}",
        f"data.num_classes={len(CLASSES)}", "train.eval_batch_size=4", f"log.output={out}"]
    # The recipe's batch arithmetic: a global batch of 4 in micro-batches of 2 (two
    # accumulation steps) where it sets one, else micro-batches of 2.
    overrides += (["train.global_batch=4", "train.batch_size=2"]
                  if recipe.train.global_batch is not None else ["train.batch_size=2"])
    # float16 autocast runs about 20x slower than bfloat16 on a CPU (no fast fp16 kernels);
    # the same autocast path runs in bfloat16 here, and tests/test_engine.py trains with
    # float16 and its GradScaler.
    if recipe.train.amp_dtype == "float16":
        overrides.append("train.amp_dtype=bfloat16")
    # timm's ViTs fix the patch grid at creation: build them for the small test images.
    if "deit" in recipe_path.name:
        overrides.append("model.kwargs.img_size=32")
    return overrides
