"""`powergrad validate SOURCE [key=value ...]`: test loss, top-1 and top-5 of trained weights
without training (timm's validate.py): a run folder's checkpoint (its EMA with --ema), an
export folder, or a weights file in any common layout, on the recipe's evaluation data or on
an ImageFolder tree or .beton given with --data. Evaluation is the engine's own (the recipe's
centre crop, resolution, test-time flip and autocast as this machine runs it), so a run's
final evaluation is reproduced exactly; under torchrun each process scores its share and
every image is counted once.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from powergrad.config.loading import RUN_RECIPE, load_recipe
from powergrad.config.schema import Recipe
from powergrad.training.weights import WeightsError


class ValidateError(ValueError):
    """A source, recipe or data set validate cannot use; the message says what to give."""


def source_recipe(source: Path, recipe_path: str | None, overrides: list[str]) -> Recipe:
    """The recipe that says which network and evaluation: --recipe, else the run folder's."""
    if recipe_path is None:
        if not (source.is_dir() and (source / RUN_RECIPE).is_file()):
            raise ValidateError(f"{source}: not a run folder, so name the recipe that built "
                                "these weights with --recipe RECIPE.yaml (for the network "
                                "and its evaluation transform)")
        recipe_path = str(source / RUN_RECIPE)
    return load_recipe(recipe_path, overrides)


def with_data(recipe: Recipe, data: str | None) -> Recipe:
    """The recipe reading its evaluation images from `data` (a folder or a .beton)."""
    if data is None:
        return recipe
    import dataclasses

    path = Path(data).expanduser()
    if not path.exists():
        raise ValidateError(f"--data {data}: no such file or folder")
    if path.is_dir():
        changes = dict(dataset="imagefolder", loader="torchvision", train_dir=str(path),
                       val_dir=str(path), train_beton=None, val_beton=None)
    elif path.suffix == ".beton" and path.is_file():
        changes = dict(dataset="imagefolder", loader="ffcv", train_beton=str(path),
                       val_beton=str(path))
    else:
        raise ValidateError(f"--data {data}: expected an ImageFolder directory or a .beton "
                            "file")
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, **changes))


def resolve(source: str, recipe_path: str | None, overrides: list[str],
            data: str | None) -> tuple[Path, Recipe]:
    """(the source's path, the recipe it is scored with): what validate and the launcher
    check before any work; ValidateError or RecipeError naming what is missing."""
    source_path = Path(source).expanduser()
    if not source_path.exists():  # before asking for a recipe it might not need
        raise ValidateError(f"{source}: no such file or folder")
    return source_path, with_data(source_recipe(source_path, recipe_path, overrides), data)


def validate(source: str, overrides: list[str], *, checkpoint: str = "last", ema: bool = False,
             recipe_path: str | None = None, data: str | None = None) -> dict:
    """The scores of `source`'s weights, with what was measured and how: the device,
    processes, machine fit, model and evaluation loader as training builds them
    (build_training's evaluation-only form), and training's own evaluate()."""
    from powergrad.training.evaluate import evaluate
    from powergrad.training.preflight_data import check_data_matches_model, inspect_data
    from powergrad.training.setup import build_training
    from powergrad.training.weights import load_weights, read_state_dict, weights_file

    source_path, recipe = resolve(source, recipe_path, overrides, data)
    path = weights_file(source_path, (f"{checkpoint}.pth", "model.safetensors"))
    weights = read_state_dict(path, ema=ema)  # a damaged file fails before any data loads
    # the data's classes and channels against the model: preflight's check, as training's
    check_data_matches_model(recipe, inspect_data(recipe))
    t = build_training(recipe, with_weights=False, evaluation_only=True)
    load_weights(t.model, weights, path, f"the recipe's {recipe.model.model}")
    stats = evaluate(t.model, t.eval_loader, t.device, t.amp_dtype, recipe.train.tta_flip)
    return {"weights": str(path), "ema": ema, "recipe": recipe.source, "data": t.fit.loader,
            "eval_data": recipe.data.val_dir or recipe.data.val_beton or recipe.data.root,
            "processes": t.dist_info.world_size, "images": stats["images"],
            "test_loss": stats["loss"], "test_top1": stats["top1"], "test_top5": stats["top5"],
            "ran_with": t.fit.record()}


def main(source: str, overrides: list[str], *, checkpoint: str, ema: bool,
         recipe_path: str | None, data: str | None, out: str | None) -> int:
    from powergrad.config.loading import RecipeError
    from powergrad.data.imagefolder_checks import ImageDataError
    from powergrad.system.distributed import shutdown, world_from_env

    try:
        result = validate(source, overrides, checkpoint=checkpoint, ema=ema,
                          recipe_path=recipe_path, data=data)
    except (ValidateError, WeightsError, RecipeError, ImageDataError) as err:
        if world_from_env().is_main:
            print(f"validate: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    shutdown()
    if not world_from_env().is_main:
        return 0
    print(f"{result['weights']}: test top-1 {result['test_top1']:.2f} %, top-5 "
          f"{result['test_top5']:.2f} %, loss {result['test_loss']:.4f} on {result['eval_data']}"
          f" ({result['processes']} process(es))")
    text = json.dumps(result, indent=2) + "\n"
    if out:
        Path(out).write_text(text)
    else:
        print(text, end="")
    return 0
