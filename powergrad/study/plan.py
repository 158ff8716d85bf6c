"""A study's plan file: the claims, the arms (recipe + seeds) each claim compares, and the
rules of the verdict. `load_plan` checks all of it before anything trains: every key known,
every arm's recipe loads, every claim names known arms and metrics.

    margin_points: 0.1   # top-1 differences smaller than this count as no gain
    fits_at: 99.0        # a baseline at this final train top-1 or above fits its training set
    arms:
      base: {recipe: base.yaml, seeds: [0, 1, 2], cost: resnet}   # recipes relative to the plan
    claims:
      pgt: {statement: ..., source: ..., baseline: base, arms: [...], expect: {METRIC: higher}}

An arm's optional `cost` groups arms whose runs take the same time per training image (the
same model and machine): an arm not yet run is estimated from the measured runs of its group.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from powergrad.config.loading import RecipeError, load_recipe
from powergrad.config.yaml_files import UnreadableYaml, read_yaml_file
from powergrad.study.metrics import METRICS

DIRECTIONS = ("higher", "lower", "no_gain")


class StudyError(ValueError):
    """A plan or record problem, naming the file, the key, the value and what was expected."""

    def __init__(self, file: str | Path, key: str, message: str):
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: Path
    seeds: tuple[int, ...]
    cost: str  # arms of one cost take the same time per training image (the time estimate)


@dataclass
class Claim:
    name: str
    statement: str
    source: str  # where the paper says it
    baseline: str  # arm
    arms: list[str]  # arms compared with the baseline, paired by seed
    expect: dict[str, str]  # metric -> higher | lower | no_gain (relative to the baseline)
    # the paper's number as text: metric -> text, or arm -> {metric -> text}
    paper: dict[str, str | dict[str, str]] = field(default_factory=dict)
    sweep: str | None = None  # a dotted recipe key: plot the metrics against its value
    profiles: bool = False  # ViT arms: plot per-block variance, gradient norm and gate
    requires: str | None = None  # a feature the suite lacks: listed, not run, reported as such

    def arm_names(self) -> list[str]:
        return [self.baseline, *self.arms] if not self.requires else []

    def paper_for(self, arm: str, metric: str) -> str:
        per_arm = self.paper.get(arm)
        text = per_arm.get(metric) if isinstance(per_arm, dict) else self.paper.get(metric)
        return str(text) if text is not None else "-"


@dataclass
class StudyPlan:
    file: Path
    arms: dict[str, Arm]
    claims: dict[str, Claim]
    margin_points: float  # top-1 differences smaller than this count as no gain
    fits_at: float  # a baseline whose final train top-1 reaches this fits its training set
    description: str = ""  # the report's title

    def select(self, names: list[str] | None) -> list[Claim]:
        if not names:
            return list(self.claims.values())
        unknown = [n for n in names if n not in self.claims]
        if unknown:
            raise StudyError("--claims", "", f"unknown claim(s) {', '.join(unknown)}; the plan "
                             f"{self.file} has: {', '.join(self.claims)}")
        return [self.claims[n] for n in names]

    def arms_for(self, claims: list[Claim]) -> list[Arm]:
        names = dict.fromkeys(n for c in claims for n in c.arm_names())
        return [self.arms[n] for n in names]


_PLAN_KEYS = {"description", "margin_points", "fits_at", "arms", "claims"}
# Keys of plans written before run times were measured from the records.
_RETIRED_KEYS = {"throughput", "throughput_note"}
_ARM_KEYS = {"recipe", "seeds", "cost"}
_CLAIM_KEYS = {"statement", "source", "baseline", "arms", "expect", "paper", "sweep", "profiles",
               "requires"}


def load_plan(path: str | Path) -> StudyPlan:
    """Read and check a plan. Recipes are relative to the plan file."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(path, "", "plan file not found")
    try:
        tree = read_yaml_file(path)
    except UnreadableYaml as err:
        raise StudyError(path, "", str(err)) from None
    if isinstance(tree, dict):
        for key in sorted(_RETIRED_KEYS & set(tree)):
            raise StudyError(path, key, "no longer read: run times are measured from the "
                             "records (the runs of the same arm, or of arms with the same "
                             "`cost`); delete it")
    _expect_mapping(tree, path, "", _PLAN_KEYS)
    arms = {name: _arm(name, value, path) for name, value in _section(tree, "arms", path).items()}
    claims = {name: _claim(name, value, path, arms)
              for name, value in _section(tree, "claims", path).items()}
    return StudyPlan(file=path, arms=arms, claims=claims,
                     margin_points=_number(tree, "margin_points", path, "", positive=False),
                     fits_at=_number(tree, "fits_at", path, "", positive=True),
                     description=str(tree.get("description") or ""))


def _arm(name: str, value, path: Path) -> Arm:
    where = f"arms.{name}"
    _expect_mapping(value, path, where, _ARM_KEYS)
    seeds = value.get("seeds")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                       for s in seeds)):
        raise StudyError(path, f"{where}.seeds", f"got {seeds!r}; expected a list of "
                         "distinct non-negative integers")
    cost = value.get("cost", name)
    if not isinstance(cost, str) or not cost:
        raise StudyError(path, f"{where}.cost", f"got {cost!r}; expected a name shared by "
                         "arms whose runs take the same time per image")
    recipe = Path(os.path.normpath(path.parent / str(value.get("recipe"))))
    try:
        load_recipe(recipe)
    except RecipeError as err:
        raise StudyError(path, f"{where}.recipe", f"does not load: {err}") from None
    return Arm(name, recipe, tuple(seeds), cost)


def _claim(name: str, value, path: Path, arms: dict[str, Arm]) -> Claim:
    where = f"claims.{name}"
    _expect_mapping(value, path, where, _CLAIM_KEYS)
    for key, types, what in (("baseline", (str, type(None)), "an arm's name"),
                             ("arms", (list, type(None)), "a list of arm names"),
                             ("expect", (dict, type(None)), "a mapping metric: direction"),
                             ("paper", (dict, type(None)), "a mapping of the paper's numbers"),
                             ("sweep", (str, type(None)), "a dotted recipe key"),
                             ("requires", (str, type(None)), "a sentence"),
                             ("profiles", (bool,), "true or false"),
                             ("statement", (str,), "a sentence"),
                             ("source", (str,), "a citation")):
        if key in value and not isinstance(value[key], types):
            raise StudyError(path, f"{where}.{key}", f"got {value[key]!r}; expected {what}")
    if not all(isinstance(arm, str) for arm in value.get("arms") or []):
        raise StudyError(path, f"{where}.arms", f"got {value['arms']!r}; expected a list "
                         "of arm names")
    claim = Claim(name=name, statement=str(value.get("statement", "")),
                  source=str(value.get("source", "")), baseline=value.get("baseline"),
                  arms=list(value.get("arms") or []), expect=dict(value.get("expect") or {}),
                  paper={k: ({m: str(t) for m, t in v.items()} if isinstance(v, dict)
                             else str(v)) for k, v in (value.get("paper") or {}).items()},
                  sweep=value.get("sweep"), profiles=bool(value.get("profiles", False)),
                  requires=value.get("requires"))
    if claim.requires is None:
        for arm in [claim.baseline, *claim.arms]:
            if arm not in arms:
                raise StudyError(path, where, f"names arm {arm!r}; expected one of: "
                                 f"{', '.join(arms)}")
        if not claim.arms:
            raise StudyError(path, f"{where}.arms", "empty; expected the arms compared "
                             "with the baseline")
        if claim.sweep is not None and claim.sweep not in load_recipe(
                arms[claim.baseline].recipe).flat():
            raise StudyError(path, f"{where}.sweep", f"got {claim.sweep!r}; expected a "
                             "dotted recipe key such as pgt.alpha")
    for metric, direction in claim.expect.items():
        if metric not in METRICS:
            raise StudyError(path, f"{where}.expect.{metric}", f"unknown metric; expected "
                             f"one of: {', '.join(METRICS)}")
        if direction not in DIRECTIONS:
            raise StudyError(path, f"{where}.expect.{metric}", f"got {direction!r}; "
                             f"expected one of: {', '.join(DIRECTIONS)}")
    return claim


def _expect_mapping(value, path: Path, where: str, allowed: set[str]) -> None:
    if not isinstance(value, dict):
        raise StudyError(path, where, f"expected a mapping, got {value!r}")
    for key in value:
        if key not in allowed:
            raise StudyError(path, f"{where}.{key}" if where else key,
                             f"unknown key; expected one of: {', '.join(sorted(allowed))}")


def _section(tree: dict, key: str, path: Path) -> dict:
    value = tree.get(key)
    if not isinstance(value, dict) or not value:
        raise StudyError(path, key, f"got {value!r}; expected a non-empty mapping")
    return value


def _number(tree: dict, key: str, path: Path, where: str, positive: bool) -> float:
    value = tree.get(key)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value > 0 if positive else value >= 0))
    if not ok:
        raise StudyError(path, f"{where}.{key}" if where else key, f"got {value!r}; expected a "
                         f"{'positive' if positive else 'non-negative'} finite number")
    return float(value)
