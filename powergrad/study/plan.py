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
same model and machine): an arm not yet run is estimated from the measured runs of its group,
and with none yet from the cost's stated time per optimizer step, if `costs` gives one:

    costs:
      rn18: {step_seconds: 0.105, gpus: 1, source: "where the figure comes from"}

`runs`, `records` and `out` name the plan's own folders (relative to the working directory, as
the command's options that override them), so two plans never share a report.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from powergrad.config.loading import RecipeError, build_checked, load_recipe
from powergrad.config.schema import setting
from powergrad.config.yaml_files import UnreadableYaml, read_yaml_file
from powergrad.study.metrics import METRICS

DIRECTIONS = ("higher", "lower", "no_gain")


class StudyError(ValueError):
    """A plan or record problem, naming the file, the key, the value and what was expected."""

    def __init__(self, file: str | Path, key: str, message: str):
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


@dataclass(frozen=True)
class StepTime:
    """A cost's time per optimizer step (evaluation included) on `gpus` GPUs, and its source:
    gpu-check's measurement, or a published figure until one is measured."""
    seconds: float
    gpus: int
    source: str


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
    costs: dict[str, StepTime] = field(default_factory=dict)  # cost -> stated step time
    folders: dict[str, str] = field(default_factory=dict)  # runs / records / out, if given

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


# The plan file's schema, declared as a recipe's is (config/schema.setting: type, default,
# range and meaning on the field) and checked by the same code (config/loading.build_checked).
@dataclass
class ArmFile:
    recipe: str = setting("", "the arm's recipe, relative to the plan file")
    seeds: list[int] = setting([], "the seeds it trains, each once", "[0, 2147483647]")
    cost: str | None = setting(None, "arms of one cost take the same time per training image "
                                     "(the time estimate; default: the arm's own name)")


@dataclass
class ClaimFile:
    statement: str = setting("", "the claim, in a sentence")
    source: str = setting("", "where the paper says it")
    baseline: str | None = setting(None, "the arm the others are compared with")
    arms: list[str] = setting([], "the arms compared with the baseline, paired by seed")
    expect: dict = setting({}, "metric: higher | lower | no_gain, relative to the baseline")
    paper: dict = setting({}, "the paper's number as text: metric: text, or arm: {metric: text}")
    sweep: str | None = setting(None, "a dotted recipe key: plot the metrics against its value")
    profiles: bool = setting(False, "ViT arms: plot per-block variance, gradient norm and gate")
    requires: str | None = setting(None, "a feature the suite lacks: listed, not run")


@dataclass
class CostFile:
    step_seconds: float = setting(0.0, "seconds per optimizer step, evaluation included, "
                                       "averaged over a run", "(0, inf)")
    gpus: int = setting(1, "the GPUs a run of this cost takes (GPU-hours = hours x gpus)",
                        "[1, inf)")
    source: str = setting("", "where the step time comes from: gpu-check, or a published "
                              "figure with its reference")


@dataclass
class PlanFile:
    description: str = setting("", "the report's title")
    margin_points: float = setting(0.1, "top-1 differences smaller than this count as no gain",
                                   "[0, inf)")
    fits_at: float = setting(99.0, "a baseline at this final train top-1 or above fits its "
                                   "training set", "(0, 100]")
    arms: dict[str, ArmFile] = setting({}, "name: an arm (a recipe over seeds)")
    claims: dict[str, ClaimFile] = setting({}, "name: a claim (a baseline, arms, expectations)")
    costs: dict[str, CostFile] = setting({}, "cost name: its time per optimizer step, stated "
                                             "with its source (for arms not run yet)")
    runs: str | None = setting(None, "where runs train (the default of --runs)")
    records: str | None = setting(None, "where records are copied (the default of --records)")
    out: str | None = setting(None, "the report, OUT.md and OUT/ (the default of --out)")


def load_plan(path: str | Path) -> StudyPlan:
    """Read and check a plan. Recipes are relative to the plan file."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(path, "", "plan file not found")
    try:
        tree = read_yaml_file(path)
    except UnreadableYaml as err:
        raise StudyError(path, "", str(err)) from None
    if not isinstance(tree, dict):
        raise StudyError(path, "", f"expected a mapping of plan keys, got {tree!r}")
    try:
        plan = build_checked(PlanFile, tree, str(path))
    except RecipeError as err:
        raise StudyError(err.file, err.key, err.message) from None
    for key in ("arms", "claims"):
        if not getattr(plan, key):
            raise StudyError(path, key, f"got {tree.get(key)!r}; expected a non-empty mapping")
    arms = {name: _arm(name, arm, path) for name, arm in plan.arms.items()}
    claims = {name: _claim(name, claim, path, arms) for name, claim in plan.claims.items()}
    costs = {}
    for name, cost in plan.costs.items():
        if name not in {arm.cost for arm in arms.values()}:
            raise StudyError(path, f"costs.{name}", "no arm has this cost; expected one of: "
                             f"{', '.join(sorted({arm.cost for arm in arms.values()}))}")
        if not cost.source.strip():
            raise StudyError(path, f"costs.{name}.source", "empty; expected where the step "
                             "time comes from (gpu-check, or a published figure)")
        costs[name] = StepTime(cost.step_seconds, cost.gpus, cost.source)
    folders = {key: getattr(plan, key) for key in ("runs", "records", "out")
               if getattr(plan, key) is not None}
    return StudyPlan(file=path, arms=arms, claims=claims, margin_points=plan.margin_points,
                     fits_at=plan.fits_at, description=plan.description, costs=costs,
                     folders=folders)


def _arm(name: str, spec: ArmFile, path: Path) -> Arm:
    where = f"arms.{name}"
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise StudyError(path, f"{where}.seeds", f"got {spec.seeds!r}; expected a list of "
                         "distinct non-negative integers")
    recipe = Path(os.path.normpath(path.parent / spec.recipe))
    try:
        load_recipe(recipe)
    except RecipeError as err:
        raise StudyError(path, f"{where}.recipe", f"does not load: {err}") from None
    return Arm(name, recipe, tuple(spec.seeds), spec.cost or name)


def _claim(name: str, spec: ClaimFile, path: Path, arms: dict[str, Arm]) -> Claim:
    where = f"claims.{name}"
    claim = Claim(name=name, statement=spec.statement, source=spec.source,
                  baseline=spec.baseline, arms=list(spec.arms), expect=dict(spec.expect),
                  paper={k: ({m: str(t) for m, t in v.items()} if isinstance(v, dict)
                             else str(v)) for k, v in spec.paper.items()},
                  sweep=spec.sweep, profiles=spec.profiles, requires=spec.requires)
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
