"""Recipe loading: inheritance, overrides, and a clear error for each kind of bad input."""
from pathlib import Path

import pytest
import yaml

from powergrad.recipe import RecipeError, dump_recipe, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(tmp_path, name, tree):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree) if isinstance(tree, dict) else tree)
    return path


def test_every_shipped_recipe_loads():
    files = sorted(RECIPES.rglob("*.yaml"))
    assert len(files) >= 7
    for path in files:
        load_recipe(path)


def test_extends_overrides_only_what_changes(tmp_path):
    write(tmp_path, "base.yaml", {"optim": {"lr": 0.3, "momentum": 0.8}, "train": {"epochs": 4}})
    child = write(tmp_path, "child.yaml", {"extends": "base.yaml", "optim": {"lr": 0.1},
                                            "pgt": {"enabled": True, "alpha": 0.25}})
    recipe = load_recipe(child, ["train.epochs=7", "sched.decay_milestones=[3, 5]"])
    assert (recipe.optim.lr, recipe.optim.momentum) == (0.1, 0.8)
    assert (recipe.pgt.enabled, recipe.pgt.alpha) == (True, 0.25)
    assert recipe.train.epochs == 7 and recipe.sched.decay_milestones == [3, 5]


def test_saved_recipe_loads_back_identically(tmp_path):
    recipe = load_recipe(RECIPES / "fashion_mnist" / "nobn_agc_pgt.yaml")
    dump_recipe(recipe, tmp_path / "saved.yaml")
    again = load_recipe(tmp_path / "saved.yaml")
    assert again.digest() == recipe.digest()


def test_digest_changes_with_settings():
    a = load_recipe(RECIPES / "fashion_mnist" / "resnet_baseline.yaml")
    b = load_recipe(RECIPES / "fashion_mnist" / "resnet_baseline.yaml", ["optim.lr=0.3"])
    assert a.digest() != b.digest()


@pytest.mark.parametrize("tree, key, expected", [
    ({"optim": {"lrr": 0.1}}, "optim.lrr", "did you mean 'optim.lr'"),
    ({"optimm": {"lr": 0.1}}, "optimm", "did you mean 'optim'"),
    ({"optim": {"lr": "fast"}}, "optim.lr", "expected a number, got 'fast'"),
    ({"train": {"epochs": 2.5}}, "train.epochs", "expected an integer"),
    ({"train": {"channels_last": "yes"}}, "train.channels_last", "expected true or false"),
    ({"pgt": {"enabled": True, "alpha": 1.5}}, "pgt.alpha", "expected a value in [0.0, 1.0]"),
    ({"pgt": {"alpha": -0.1}}, "pgt.alpha", "expected a value in [0.0, 1.0]"),
    ({"clip": {"clip_mode": "agcc"}}, "clip.clip_mode", "did you mean 'agc'"),
    ({"model": {"model": "resnet181"}}, "model.model", "is not a timm model"),
    ({"data": {"scale": [0.08]}}, "data.scale", "expected a list of 2 numbers"),
    ({"optim": 3}, "optim", "expected a section"),
])
def test_bad_values_name_file_key_value_and_expectation(tmp_path, tree, key, expected):
    path = write(tmp_path, "bad.yaml", tree)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: ")
    assert expected in message


def test_error_names_the_file_that_set_the_key(tmp_path):
    parent = write(tmp_path, "parent.yaml", {"train": {"batch_size": 0}})
    child = write(tmp_path, "child.yaml", {"extends": "parent.yaml"})
    with pytest.raises(RecipeError, match=f"^{parent}: train.batch_size: got 0"):
        load_recipe(child)


def test_bad_override_names_the_command_line(tmp_path):
    path = write(tmp_path, "ok.yaml", {})
    with pytest.raises(RecipeError, match=r"command line \(pgt.alpha=2\): pgt.alpha"):
        load_recipe(path, ["pgt.alpha=2"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(path, ["pgt.alpha"])


def test_missing_files_and_cycles(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    write(tmp_path, "child.yaml", {"extends": "gone.yaml"})
    with pytest.raises(RecipeError, match="gone.yaml: recipe file not found .extended by"):
        load_recipe(tmp_path / "child.yaml")
    write(tmp_path, "a.yaml", {"extends": "b.yaml"})
    write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="circular extends"):
        load_recipe(tmp_path / "a.yaml")


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "broken.yaml", "optim: {lr: [0.1\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
