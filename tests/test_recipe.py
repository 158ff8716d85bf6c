"""Recipe loading: inheritance, overrides, and a clear error for each kind of bad input."""
from pathlib import Path

import pytest
import yaml

from powergrad.config.loading import RecipeError, dump_recipe, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(tmp_path, name, tree):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree) if isinstance(tree, dict) else tree)
    return path


def test_every_shipped_recipe_loads():
    files = sorted(p for p in RECIPES.rglob("*.yaml")
                   if p != RECIPES / "study" / "plan.yaml")  # the study's plan, not a recipe
    assert len(files) == len(list(RECIPES.rglob("*.yaml"))) - 1 > 100  # all but plan.yaml
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
    ({"pgt": {"enabled": True, "alpha": 1.5}}, "pgt.alpha", "got 1.5, expected a value in [0, 1]"),
    ({"pgt": {"alpha": -0.1}}, "pgt.alpha", "got -0.1, expected a value in [0, 1]"),
    ({"optim": {"lr": float("nan")}}, "optim.lr", "got nan, expected a finite number"),
    ({"loss": {"smoothing": float("inf")}}, "loss.smoothing", "got inf, expected a finite number"),
    ({"optim": {"opt_betas": [0.9, float("-inf")]}}, "optim.opt_betas",
     "got -inf, expected a finite number"),
    ({"log": {"log_interval": 0}}, "log.log_interval", "got 0, expected a value in [1, inf)"),
    ({"train": {"seed": -1}}, "train.seed", "got -1, expected a value in [0, 2147483647]"),
    ({"train": {"threads": 0}}, "train.threads", "got 0, expected a value in [1, inf)"),
    ({"optim": {"momentum": -0.9}}, "optim.momentum", "got -0.9, expected a value in [0, 1]"),
    ({"data": {"train_subset": 0}}, "data.train_subset", "got 0, expected a value in [1, inf)"),
    ({"data": {"train_subset": -100}}, "data.train_subset",
     "got -100, expected a value in [1, inf)"),
    ({"data": {"eval_subset": 0}}, "data.eval_subset", "got 0, expected a value in [1, inf)"),
    ({"clip": {"clip_grad": 0.0}}, "clip.clip_grad", "got 0.0, expected a value in (0, inf)"),
    ({"data": {"scale": [0.08, 1.5]}}, "data.scale",
     "got (0.08, 1.5), expected each item in (0, 1]"),
    ({"data": {"scale": [0.9, 0.1]}}, "data.scale",
     "got [0.9, 0.1], expected [low, high] with low <= high"),
    ({"sched": {"decay_milestones": [60, 30]}}, "sched.decay_milestones",
     "got [60, 30], expected increasing epochs"),
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


def test_a_schedule_timm_would_refuse_is_refused_on_load_naming_its_key():
    """wsd's decay must fit in the epochs after the warm-up, and timm's plateau steps per epoch
    on a metric, not per update: one line naming the key, not timm's traceback when the run
    (or describe) builds its schedule. The bound is timm's own: it builds the longest decay
    accepted and refuses the next."""
    import torch
    from timm.scheduler import create_scheduler_v2

    recipe = RECIPES / "imagenet" / "resnet18_cosine_pgt.yaml"  # warm-up 5, decay_epochs 30
    wsd = ["sched.sched=wsd", "train.epochs=20"]
    with pytest.raises(RecipeError, match=r"pgt.yaml: sched.decay_epochs: got 30 with sched wsd, "
                                          r".* = 15 epochs; expected a value in \(0, 15\]"):
        load_recipe(recipe, wsd)
    with pytest.raises(RecipeError, match=r"sched.warmup_epochs: got 5 with train.epochs 5: "):
        load_recipe(recipe, ["sched.sched=wsd", "train.epochs=5"])
    with pytest.raises(RecipeError, match=r"sched.sched: got 'plateau', expected one of cosine"):
        load_recipe(recipe, ["sched.sched=plateau"])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    for decay in (15, 0.5):  # the whole span, a fraction of it
        load_recipe(recipe, [*wsd, f"sched.decay_epochs={decay}"])
        create_scheduler_v2(optimizer, sched="wsd", num_epochs=20, warmup_epochs=5,
                            decay_epochs=decay, step_on_epochs=False, updates_per_epoch=7)
    with pytest.raises(ValueError, match="wsd schedule requires"):
        create_scheduler_v2(optimizer, sched="wsd", num_epochs=20, warmup_epochs=5,
                            decay_epochs=16, step_on_epochs=False, updates_per_epoch=7)


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


def test_nan_and_inf_on_the_command_line(tmp_path):
    path = write(tmp_path, "ok.yaml", {})
    with pytest.raises(RecipeError, match=r"^command line \(optim.lr=.nan\): optim.lr: got nan, "
                                          "expected a finite number$"):
        load_recipe(path, ["optim.lr=.nan"])
    with pytest.raises(RecipeError, match="got -inf, expected a finite number"):
        load_recipe(path, ["optim.weight_decay=-.inf"])


def test_the_float_spellings_users_write(tmp_path):
    # YAML 1.1 (PyYAML's safe_load) wants a dot and a signed exponent: 1e-3 is a string there
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}
    path = tmp_path / "floats.yaml"
    path.write_text("optim: {lr: 1e-3, weight_decay: 5E-4, opt_eps: 1.e-8}\n"
                    "sched: {warmup_lr: .5e-2, min_lr: 1_000.5e-7, decay_rate: +2e0}\n"
                    "train: {epochs: 3}\n")
    recipe = load_recipe(path, ["pgt.alpha=25e-2"])
    got = (recipe.optim.lr, recipe.optim.weight_decay, recipe.optim.opt_eps,
           recipe.sched.warmup_lr, recipe.sched.min_lr, recipe.sched.decay_rate,
           recipe.pgt.alpha)
    assert got == (float("1e-3"), float("5e-4"), float("1e-8"), float("0.005"),
                   float("1000.5e-7"), 2.0, 0.25)
    assert type(recipe.train.epochs) is int and recipe.train.epochs == 3  # ints stay ints
    with pytest.raises(RecipeError, match=r"train.epochs: expected an integer, got 100.0"):
        load_recipe(path, ["train.epochs=1e2"])
    with pytest.raises(RecipeError, match=r"optim.lr: expected a number, got '1e-3x'"):
        load_recipe(path, ["optim.lr=1e-3x"])


def test_a_key_set_twice_is_refused_with_its_lines(tmp_path):
    path = write(tmp_path, "twice.yaml", "optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value) == (f"{path}: optim.lr: set twice, on lines 2 and 4; "
                              "expected each key once")
    path = write(tmp_path, "sections.yaml",
                 "train: {epochs: 2}\noptim: {lr: 0.1}\ntrain: {seed: 1}\n")
    with pytest.raises(RecipeError, match=f"^{path}: train: set twice, on lines 1 and 3"):
        load_recipe(path)


def test_a_key_set_twice_in_a_parent_names_the_parent(tmp_path):
    parent = write(tmp_path, "parent.yaml", "paper: {source: T1, test_top1: 1, test_top1: 2}\n")
    child = write(tmp_path, "child.yaml", {"extends": "parent.yaml"})
    with pytest.raises(RecipeError, match=f"^{parent}: paper.test_top1: set twice, on line 1;"):
        load_recipe(child)


def test_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    path = write(tmp_path, "anchors.yaml",
                 "paper: {a: &x {k: 1}, b: *x}\noptim: {lr: 0.1, momentum: 0.9}\n")
    assert load_recipe(path).paper == {"a": {"k": 1}, "b": {"k": 1}}


def test_empty_recipe_file(tmp_path):
    for text in ("", "# only a comment\n"):
        path = write(tmp_path, "empty.yaml", text)
        with pytest.raises(RecipeError, match=f"^{path}: the file is empty; expected sections"):
            load_recipe(path)


def test_every_setting_is_declared_with_a_meaning_and_every_range_parses():
    from powergrad.config.schema import declared_settings, in_interval

    settings = list(declared_settings())
    assert len(settings) > 100
    assert [key for key, field, _ in settings if len(field.metadata.get("meaning", "")) < 5] == []
    for key, field, _ in settings:
        if field.metadata.get("range"):
            in_interval(0.5, field.metadata["range"])  # raises on a malformed interval


def _set_dotted(recipe, key: str, value) -> None:
    *sections, name = key.split(".")
    owner = recipe
    for part in sections:
        owner = getattr(owner, part)
    setattr(owner, name, value)


def test_the_digest_changes_exactly_with_the_settings_that_decide_training():
    from powergrad.config.schema import Recipe, declared_settings

    base = Recipe().digest()
    not_training = set()
    for key, _, _ in declared_settings():
        recipe = Recipe()
        _set_dotted(recipe, key, "changed")  # any other value: the digest hashes it as text
        assert (recipe.digest() != base) == Recipe.decides_training(key), key
        if not Recipe.decides_training(key):
            not_training.add(key)
    # the whole log section, and these four beside it: how a run is recorded or launched
    assert not_training == ({"description", "paper", "train.threads", "train.rendezvous_timeout"}
                            | {key for key, _, _ in declared_settings() if key.startswith("log.")})


def test_the_digest_is_the_one_the_recorded_runs_have():
    from powergrad.config.schema import Recipe, declaration, declared_settings

    # Digests computed before the added settings were marked on their fields (with
    # setting(added_in=...) instead of a table of their defaults): the study's records and
    # existing run folders hold digests made this way.
    recipe = Recipe()
    assert recipe.digest() == "6919095317df"
    recipe.train.sync_bn, recipe.data.aa, recipe.data.reprob = True, "rand-m9-mstd0.5", 0.25
    assert recipe.digest() == "0e419126df84"
    # an added setting written out at its default is the recipe that left it out
    added = [key for key, _, _ in declared_settings() if declaration(key).added_in]
    assert len(added) == 11
    for key in added:
        recipe = Recipe()
        _set_dotted(recipe, key, declaration(key).default)
        assert recipe.digest() == "6919095317df", key


def test_every_path_setting_expands_home_and_variables_and_no_other_string_does(
        tmp_path, monkeypatch):
    import typing

    from powergrad.config.schema import declared_settings, path_settings

    from powergrad.config import loading

    monkeypatch.setenv("PG_PLACE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # every string setting gets a path-like value; model.model and the like are then no timm
    # name: the checks after expansion are not what this test is about
    monkeypatch.setattr(loading, "_check_semantics", lambda *args: None)
    strings = [key for key, _, hint in declared_settings()
               if hint is str or str in typing.get_args(hint)]
    overrides = [f"{key}=$PG_PLACE/{key}" if i % 2 else f"{key}=~/{key}"
                 for i, key in enumerate(strings)]
    recipe = load_recipe(RECIPES / "fashion_mnist" / "resnet_baseline.yaml", overrides)
    flat = recipe.flat()
    for i, key in enumerate(strings):
        written = f"$PG_PLACE/{key}" if i % 2 else f"~/{key}"
        expanded = f"{tmp_path}/{key}" if i % 2 else f"{tmp_path}/home/{key}"
        assert flat[key] == (expanded if key in path_settings() else written), key
    # the settings expanded before `path=True` marked them (loading.PATH_KEYS) still are
    assert {"data.root", "data.train_dir", "data.val_dir", "data.train_beton", "data.val_beton",
            "log.output", "log.resume", "model.initial_checkpoint"} <= set(path_settings())


def test_the_mapping_typed_settings_are_kept_whole(tmp_path):
    import typing

    from powergrad.config.schema import Recipe, declared_settings, is_free_form

    mappings = [key for key, _, hint in declared_settings()
                if hint is dict or typing.get_origin(hint) is dict]
    assert mappings  # model.kwargs, data.extra, paper
    assert [key for key, _, _ in declared_settings() if is_free_form(key)] == mappings
    parent, child = {}, {"extends": "base.yaml"}
    for key in mappings:
        _set_tree(parent, key, {"kept": 1, "nested": {"a": 1}})
        _set_tree(child, key, {"nested": {"b": 2}})
    write(tmp_path, "base.yaml", parent)
    recipe = load_recipe(write(tmp_path, "child.yaml", child))
    flat = recipe.flat()
    for key in mappings:
        # a child's mapping replaces its parent's whole, not key by key as a section's would
        node = recipe
        for part in key.split("."):
            node = getattr(node, part)
        assert node == {"nested": {"b": 2}}, key
        if key in flat:  # flat() leaves out paper
            assert flat[key] == {"nested": {"b": 2}}, key
        assert not [k for k in flat if k.startswith(f"{key}.")], key
    assert "paper" not in flat and Recipe().flat()["model.kwargs"] == {}


def _set_tree(tree: dict, key: str, value) -> None:
    *sections, name = key.split(".")
    for part in sections:
        tree = tree.setdefault(part, {})
    tree[name] = value
