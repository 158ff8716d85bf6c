"""Recipes: one YAML file per run, loaded and validated before any work starts.

A recipe may name a parent with `extends: other.yaml` (a path relative to the file); the child
overrides the parent key by key, so paper variants differ only in what changes. Command-line
overrides use dotted keys: `optim.lr=0.2 pgt.alpha=0.25`. Types, ranges and meanings come
from the schema (schema.py); the checks here that span several keys are written out.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

from powergrad.config.schema import Recipe, in_interval, is_free_form, path_settings
from powergrad.config.yaml_files import DuplicateKey, UnreadableYaml, parse_yaml, read_yaml_file


class RecipeError(ValueError):
    """A recipe problem, naming the file, the key, the value and what was expected."""

    def __init__(self, file: str, key: str, message: str):
        self.file, self.key, self.message = file, key, message
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


def fail_on(recipe: Recipe, key: str, message: str):
    """Raise the RecipeError for `key` of a loaded recipe, naming the file (or command line)
    that set it: for checks made after loading (preflight)."""
    raise RecipeError(recipe.origins.get(key, recipe.source), key, message)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (following `extends:`), apply `key=value` overrides, validate."""
    path = Path(path)
    tree, origins = _load_tree(path, chain=())
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value, file=str(path))
        origins[key] = f"command line ({item})"
    recipe = _build(Recipe, tree, prefix="", origins=origins, default_file=str(path))
    recipe.source = str(path)
    _expand_paths(recipe, origins, str(path))
    if is_run_recipe(path):  # a run folder's own copy continues that run, from any folder
        for key, value in (("log.output", str(path.parent.parent)),
                           ("log.experiment", path.parent.name)):
            if not origins.get(key, "").startswith("command line"):
                setattr(recipe.log, key.split(".")[1], value)
    recipe.origins = dict(origins)
    _check_semantics(recipe, origins, str(path))
    return recipe


def _load_tree(path: Path, chain: tuple) -> tuple[dict, dict]:
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise RecipeError(str(path), "", f"recipe file not found{where}")
    if path.resolve() in chain:
        raise RecipeError(str(path), "extends", "circular extends: "
                          + " -> ".join(str(p) for p in chain + (path,)))
    try:
        tree = read_yaml_file(path)
    except UnreadableYaml as err:
        raise RecipeError(str(path), "", str(err)) from None
    if tree is None:  # all defaults is never what an empty file meant
        raise RecipeError(str(path), "", "the file is empty; expected sections such as "
                                         "model, data, train (or `extends: base.yaml`)")
    if not isinstance(tree, dict):
        raise RecipeError(str(path), "", f"expected a mapping of sections, got {type(tree).__name__}")
    parent_name = tree.pop("extends", None)
    base, origins = ({}, {})
    if parent_name is not None:
        if not isinstance(parent_name, str):
            raise RecipeError(str(path), "extends", f"expected a file path, got {parent_name!r}")
        base, origins = _load_tree(path.parent / parent_name, chain + (path.resolve(),))
    _merge(base, tree, origins, str(path), prefix="")
    return base, origins


def _merge(base: dict, child: dict, origins: dict, file: str, prefix: str) -> None:
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        if (isinstance(value, dict) and isinstance(base.get(key), dict)
                and not is_free_form(dotted)):
            _merge(base[key], value, origins, file, dotted + ".")
        else:
            base[key] = value
            origins[dotted] = file
            for sub in _leaf_keys(value, dotted):
                origins[sub] = file


def _leaf_keys(value, prefix: str):
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{prefix}.{k}"
            yield from _leaf_keys(v, f"{prefix}.{k}")


def _parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise RecipeError("command line", item, "expected key=value (e.g. optim.lr=0.2)")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), parse_yaml(raw) if raw != "" else None
    except DuplicateKey as err:
        raise RecipeError(f"command line ({item})", f"{key.strip()}.{err.key}", err.message) from None
    except yaml.YAMLError:
        return key.strip(), raw


def _set_dotted(tree: dict, key: str, value, file: str) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(file, key, f"{part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, tree, prefix: str, origins: dict, default_file: str):
    """Turn a nested dict into the dataclass `cls`, checking every key and type."""
    if not isinstance(tree, dict):
        raise RecipeError(origins.get(prefix.rstrip("."), default_file), prefix.rstrip("."),
                          f"expected a section (mapping), got {tree!r}")
    hints = typing.get_type_hints(cls)
    # the keys: fields declared with schema.setting, and sections (Recipe.source and .origins,
    # set by load_recipe, are neither)
    names = [f.name for f in dataclasses.fields(cls)
             if "meaning" in f.metadata or dataclasses.is_dataclass(hints[f.name])]
    values = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        file = origins.get(dotted, default_file)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise RecipeError(file, dotted, f"unknown key (valid: {', '.join(names)}){hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            values[key] = _build(hint_type, value, dotted + ".", origins, default_file)
        elif _section_map(hint_type):  # named sections of one kind (a study plan's arms)
            if not isinstance(value, dict):
                raise RecipeError(file, dotted, f"expected a mapping of names to sections, "
                                                f"got {value!r}")
            values[key] = {name: _build(_section_map(hint_type), section, f"{dotted}.{name}.",
                                        origins, default_file)
                           for name, section in value.items()}
        else:
            values[key] = _coerce(value, hint_type, file, dotted)
    return cls(**values)


def _section_map(hint):
    """The dataclass X of a `dict[str, X]` hint, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1]
    return None


def build_checked(cls, tree, file: str):
    """A YAML mapping turned into the dataclass `cls` declared with schema.setting fields
    (a recipe's sections, a study plan): every key known, every type and range as declared,
    or a RecipeError naming the file, the dotted key and what was expected."""
    value = _build(cls, tree, prefix="", origins={}, default_file=file)

    def fail(key: str, message: str):
        raise RecipeError(file, key, message)
    check_ranges(value, "", fail)
    return value


def check_ranges(value, prefix: str, fail) -> None:
    """Each field's declared range (schema.setting) on a built dataclass, its sections and
    named sections included; `fail(dotted key, message)` on the first value outside."""
    for f in dataclasses.fields(value):
        item, key = getattr(value, f.name), f"{prefix}{f.name}"
        interval = f.metadata.get("range")
        if dataclasses.is_dataclass(item):
            check_ranges(item, key + ".", fail)
        elif isinstance(item, dict) and item and all(dataclasses.is_dataclass(v)
                                                     for v in item.values()):
            for name, section in item.items():
                check_ranges(section, f"{key}.{name}.", fail)
        elif interval is not None and item is not None:
            items = item if isinstance(item, (list, tuple)) else [item]
            if not all(in_interval(x, interval) for x in items):
                each = "each item" if isinstance(item, (list, tuple)) else "a value"
                fail(key, f"got {item!r}, expected {each} in {interval}")


def _coerce(value, hint, file: str, key: str):
    """Check `value` against a type hint (int, float, bool, str, X | None, list, tuple, dict)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], file, key)
    expected = _describe(hint)
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(file, key, f"got {value!r}, expected one of "
                                     f"{', '.join(map(str, args))}{hint_text}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan / .inf
                raise RecipeError(file, key, f"got {value!r}, expected a finite number")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise RecipeError(file, key, f"expected {expected}, got {value!r}")
        items = [_coerce(v, args[0] if args else object, file, key) for v in value]
        return tuple(items) if origin is tuple else items
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif hint is object:
        return value
    raise RecipeError(file, key, f"expected {expected}, got {value!r}")


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        count = len(args) if origin is tuple else "any number of"
        return f"a list of {count} {_PLURAL.get(args[0], 'values')}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(hint, str(hint))


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _get_dotted(recipe: Recipe, key: str):
    node = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_semantics(recipe: Recipe, origins: dict, default_file: str) -> None:
    def fail(key: str, message: str):
        raise RecipeError(origins.get(key, default_file), key, message)

    check_ranges(recipe, "", fail)
    for key in ("data.scale", "data.ratio"):
        low, high = _get_dotted(recipe, key)
        if low > high:
            fail(key, f"got {[low, high]!r}, expected [low, high] with low <= high")
    if recipe.optim.opt.lower() in ("sgd", "nesterov") and recipe.optim.momentum == 0:
        fail("optim.momentum", f"got 0 with optim.opt {recipe.optim.opt!r}, which is Nesterov "
                               "SGD in timm and needs momentum; expected a value in (0, 1], "
                               "or optim.opt: momentum for plain SGD")
    milestones = recipe.sched.decay_milestones
    if any(a >= b for a, b in zip(milestones, milestones[1:])):
        fail("sched.decay_milestones", f"got {milestones!r}, expected increasing epochs")
    import timm  # imported here: recipe loading stays fast until a model name must be checked
    if not timm.is_model(recipe.model.model):
        close = difflib.get_close_matches(recipe.model.model, timm.list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        fail("model.model", f"{recipe.model.model!r} is not a timm model{hint}")
    from powergrad.config.timm_strings import TimmStringError, check_timm_strings
    try:  # data.aa, optim.opt, sched.decay_fn: every part one timm reads, in its range
        check_timm_strings(recipe)
    except TimmStringError as err:
        fail(err.key, str(err))
    if recipe.model.gpas.enabled and recipe.model.norm == "none":
        fail("model.norm", "norm: none is for ResNets; GPAS models keep their LayerNorms")
    data = recipe.data
    if data.dataset == "imagefolder" and not (data.train_beton or data.train_dir):
        fail("data.train_dir", "dataset imagefolder needs train_dir (ImageFolder) or train_beton (ffcv)")
    if (data.min_res is None) != (data.max_res is None):
        fail("data.min_res", "set both min_res and max_res for progressive resizing, or neither")
    if data.min_res is not None and data.min_res > data.max_res:
        fail("data.min_res", f"got {data.min_res}, expected at most data.max_res ({data.max_res})")
    if data.start_ramp > data.end_ramp:
        fail("data.start_ramp", f"got {data.start_ramp}, expected at most data.end_ramp "
                                f"({data.end_ramp})")


RUN_RECIPE = "recipe.yaml"
_RUN_RECIPE_HEADER = "# resolved from "


def _expand_paths(recipe: Recipe, origins: dict, default_file: str) -> None:
    """`~` and $VARIABLES expanded as a shell would, in the settings declared path=True."""
    for key in path_settings():
        *sections, name = key.split(".")
        owner = _get_dotted(recipe, ".".join(sections)) if sections else recipe
        value = getattr(owner, name)
        if not isinstance(value, str):
            continue
        expanded = os.path.expandvars(os.path.expanduser(value))
        if "$" in expanded:
            unset = re.search(r"\$\{?(\w+)", expanded).group(1)
            raise RecipeError(origins.get(key, default_file), key,
                              f"got {value!r}: the environment variable {unset} is not set; "
                              "expected a path (set it, or write the path out)")
        setattr(owner, name, expanded)


def file_value(recipe: Recipe, key: str):
    """`key`'s value in the recipe's files alone (its `extends` chain, no command line);
    None when the files do not set it."""
    tree, _ = _load_tree(Path(recipe.source), chain=())
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def is_run_recipe(path: Path) -> bool:
    """Whether `path` is the recipe.yaml a run wrote into its folder (dump_recipe)."""
    if path.name != RUN_RECIPE or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(_RUN_RECIPE_HEADER)) == _RUN_RECIPE_HEADER.encode()


def dump_recipe(recipe: Recipe, path: Path, ran_with: dict | None = None) -> None:
    """Save the resolved recipe (no `extends`), loadable again with load_recipe; loaded from a
    run folder, it continues that run (is_run_recipe). A run continued from that copy keeps
    the name of the file it was first resolved from. `ran_with` (what the machine decided:
    the loader auto picked, the autocast dtype) goes in as comments: not settings."""
    source = recipe.source
    if source and is_run_recipe(Path(source)):
        with open(source) as f:
            source = f.readline()[len(_RUN_RECIPE_HEADER):].strip()
    comments = "".join(f"# ran with {key}: {value}\n" for key, value in (ran_with or {}).items()
                       if key != "notes")
    path.write_text(f"{_RUN_RECIPE_HEADER}{source}\n{comments}" + recipe.to_yaml())
