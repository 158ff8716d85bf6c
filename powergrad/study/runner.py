"""The seeded study: a plan file names claims, the arms (recipe + seeds) each claim compares,
and a runner trains every (arm, seed) once.

Each run is `powergrad train RECIPE train.seed=S log.output=RUNS/ARM log.experiment=sS` in a
subprocess, so a run that is stopped (the time budget, SIGTERM) checkpoints and resumes like
any other run, and one that fails does not take the study with it. A run is finished when
its final.json exists; its small record (final.json, summary.csv, recipe.yaml, the end-of-run
diagnostics from its event files, and the study's own run.json) is then copied to
RECORDS/ARM/sS, where the report (powergrad/study/report.py) reads it. Checkpoints and event
files stay under RUNS.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from powergrad.config.loading import RecipeError, load_recipe
from powergrad.config.schema import Recipe
from powergrad.config.yaml_files import UnreadableYaml, read_yaml_file

EXIT_PREEMPTED = 75  # as `powergrad train`: stopped with a checkpoint, run the same command again
RECORD_FILES = ("final.json", "summary.csv", "recipe.yaml")
DIAGNOSTIC_PREFIXES = ("pgt/", "gpas/", "clip/", "filters/")
TAIL_POINTS = 5  # diagnostics: mean of the last logged points (one point is one batch)
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
    cost: str  # a key of the plan's throughput table, for the time estimate


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
class Throughput:
    train: float  # training images per second
    eval: float  # evaluation images per second
    startup: float  # seconds per run before the first step


@dataclass
class StudyPlan:
    file: Path
    arms: dict[str, Arm]
    claims: dict[str, Claim]
    throughput: dict[str, Throughput]
    throughput_note: str
    margin_points: float  # top-1 differences smaller than this count as no gain
    fits_at: float  # a baseline whose final train top-1 reaches this fits its training set

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


# --- the plan file ------------------------------------------------------------------------------

_PLAN_KEYS = {"description", "margin_points", "fits_at", "throughput", "throughput_note", "arms",
              "claims"}
_ARM_KEYS = {"recipe", "seeds", "cost"}
_CLAIM_KEYS = {"statement", "source", "baseline", "arms", "expect", "paper", "sweep", "profiles",
               "requires"}


def load_plan(path: str | Path) -> StudyPlan:
    """Read and check a plan: every key known, every arm's recipe loads, every claim names
    known arms and metrics. Recipes are relative to the plan file."""
    from powergrad.study.report import METRICS

    path = Path(path)
    if not path.is_file():
        raise StudyError(path, "", "plan file not found")
    try:
        tree = read_yaml_file(path)
    except UnreadableYaml as err:
        raise StudyError(path, "", str(err)) from None
    _expect_mapping(tree, path, "", _PLAN_KEYS)
    throughput = {}
    for name, value in _section(tree, "throughput", path).items():
        _expect_mapping(value, path, f"throughput.{name}", {"train", "eval", "startup"})
        rates = {k: _number(value, k, path, f"throughput.{name}", positive=(k != "startup"))
                 for k in ("train", "eval", "startup")}
        throughput[name] = Throughput(**rates)
    arms = {}
    for name, value in _section(tree, "arms", path).items():
        where = f"arms.{name}"
        _expect_mapping(value, path, where, _ARM_KEYS)
        seeds = value.get("seeds")
        if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                           for s in seeds)):
            raise StudyError(path, f"{where}.seeds", f"got {seeds!r}; expected a list of "
                             "distinct non-negative integers")
        if value.get("cost") not in throughput:
            raise StudyError(path, f"{where}.cost", f"got {value.get('cost')!r}; expected one "
                             f"of the throughput entries: {', '.join(throughput) or 'none'}")
        recipe = Path(os.path.normpath(path.parent / str(value.get("recipe"))))
        try:
            load_recipe(recipe)
        except RecipeError as err:
            raise StudyError(path, f"{where}.recipe", f"does not load: {err}") from None
        arms[name] = Arm(name, recipe, tuple(seeds), value["cost"])
    claims = {}
    for name, value in _section(tree, "claims", path).items():
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
        claims[name] = claim
    return StudyPlan(file=path, arms=arms, claims=claims, throughput=throughput,
                     throughput_note=str(tree.get("throughput_note", "")),
                     margin_points=_number(tree, "margin_points", path, "", positive=False),
                     fits_at=_number(tree, "fits_at", path, "", positive=True))


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


# --- one run: where it lives, its state, its record ------------------------------------------


def run_name(arm: Arm, seed: int) -> str:
    return f"{arm.name}/s{seed}"


def run_settings(arm: Arm, seed: int, runs_root: Path) -> list[str]:
    return [f"train.seed={seed}", f"log.output={runs_root / arm.name}", f"log.experiment=s{seed}"]


def run_recipe(arm: Arm, seed: int, runs_root: Path) -> Recipe:
    return load_recipe(arm.recipe, run_settings(arm, seed, runs_root))


def train_command(arm: Arm, seed: int, runs_root: Path) -> list[str]:
    return [sys.executable, "-m", "powergrad", "train", str(arm.recipe),
            *run_settings(arm, seed, runs_root)]


def run_state(arm: Arm, seed: int, runs_root: Path, records_root: Path) -> str:
    """done (a record or final.json), diverged (recorded as such), partial (checkpoints to
    resume from) or todo."""
    record = records_root / arm.name / f"s{seed}"
    if (record / "final.json").is_file() or (runs_root / arm.name / f"s{seed}" / "final.json"
                                             ).is_file():
        return "done"
    if (record / "run.json").is_file():
        return "diverged"  # a run that stopped on non-finite values: a result, not retried
    run_dir = runs_root / arm.name / f"s{seed}"
    if (run_dir / "last.pth").is_file() or any(run_dir.glob("step-*.pth")):
        return "partial"
    return "todo"


def read_json_record(path: Path) -> dict:
    """A record's JSON file, or StudyError naming it when it is damaged (a copy cut short):
    its run is then trained again once the record is removed, never reported half-read."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise StudyError(path, "", f"damaged record ({type(err).__name__}: "
                         f"{' '.join(str(err).split())}); delete its folder "
                         f"{Path(path).parent} to train that run again") from None
    if not isinstance(value, dict):
        raise StudyError(path, "", f"damaged record (a {type(value).__name__}, not a mapping); "
                         f"delete its folder {Path(path).parent} to train that run again")
    return value


def check_record(arm: Arm, seed: int, runs_root: Path, records_root: Path) -> None:
    """Refuse a record trained with settings other than the plan's now (the recipe changed
    since): its numbers would be reported under the wrong recipe. The run directory itself is
    guarded by the engine (RunDirError), so a changed recipe is caught in both places."""
    record = records_root / arm.name / f"s{seed}"
    saved = next((record / n for n in ("final.json", "run.json") if (record / n).is_file()), None)
    if saved is None:
        return
    digest = read_json_record(saved).get("digest")
    now = run_recipe(arm, seed, runs_root).digest()
    if digest != now:
        raise StudyError(saved, "digest", f"got {digest!r}, but {arm.recipe} with seed {seed} "
                         f"now gives {now!r}: the recipe changed after this run. Delete "
                         f"{record} and {runs_root / arm.name / f's{seed}'} to train it again "
                         "with the new settings, or give the changed recipe a new arm name")


def diagnostics(run_dir: Path) -> dict:
    """Mean of the last TAIL_POINTS logged values of each PGT, GPAS and clipping scalar."""
    from powergrad.report.compare import read_scalars

    try:
        series = read_scalars(run_dir)
    except FileNotFoundError:
        return {}
    out = {}
    for tag, points in sorted(series.items()):
        if tag.startswith(DIAGNOSTIC_PREFIXES) and points:
            tail = [v for _, v in points[-TAIL_POINTS:]]
            out[tag] = {"mean": sum(tail) / len(tail), "points": len(tail),
                        "last_step": points[-1][0]}
    return out


def copy_record(arm: Arm, seed: int, runs_root: Path, records_root: Path,
                run_info: dict | None = None) -> Path:
    """The small files of a finished run, committable: no checkpoints, no event files."""
    run_dir = runs_root / arm.name / f"s{seed}"
    record = records_root / arm.name / f"s{seed}"
    record.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, record / name)
    diag = {"tail_points": TAIL_POINTS, "scalars": diagnostics(run_dir)}
    (record / "diagnostics.json").write_text(json.dumps(diag, indent=1) + "\n")
    if run_info is not None:
        (record / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
    return record


# --- the runner -------------------------------------------------------------------------------


def estimate_seconds(plan: StudyPlan, arm: Arm, records_root: Path | None = None) -> float:
    """One run's time: the median wall time of the arm's recorded runs when records_root has
    any, else from the plan's throughput table (train and test images over all epochs, the
    schedule's cool-down included, plus start-up)."""
    if records_root is not None:
        walls = [read_json_record(f).get("wall_seconds", math.nan)
                 for f in (records_root / arm.name).glob("s*/run.json")]
        walls = sorted(w for w in walls if isinstance(w, (int, float)) and math.isfinite(w))
        if walls:
            return walls[len(walls) // 2]
    recipe = load_recipe(arm.recipe)
    rate = plan.throughput[arm.cost]
    n_train = recipe.data.train_subset or 60_000  # Fashion-MNIST's sizes
    n_eval = recipe.data.eval_subset or 10_000
    epochs = recipe.train.epochs + recipe.sched.cooldown_epochs
    return rate.startup + epochs * (n_train / rate.train + n_eval / rate.eval)


def subprocess_train(command: list[str], log_file: Path, timeout: float | None) -> int:
    """Run one training command, its output to log_file. At the timeout, or when this process
    gets SIGTERM, the run is sent SIGTERM: it saves its place and exits 75."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        stopped = []

        def stop(*_):
            stopped.append(True)
            child.send_signal(signal.SIGTERM)

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            try:
                code = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop()
                code = child.wait()
            # Stopped before its training loop took over SIGTERM (while starting): nothing
            # of it was lost that a re-run does not redo, so it counts as stopped too.
            return EXIT_PREEMPTED if stopped and code == -signal.SIGTERM else code
        finally:
            signal.signal(signal.SIGTERM, previous)
            if child.poll() is None:  # an exception here (Ctrl-C): do not leave it running
                child.terminate()
                child.wait()


def log_tail(log_file: Path, lines: int = 3) -> str:
    try:
        return " | ".join(log_file.read_text().strip().splitlines()[-lines:])
    except OSError:
        return ""


def _add_wall_time(log_file: Path, seconds: float) -> float:
    """The run's wall time over all the pieces it trained in (kept beside its log)."""
    path = log_file.with_suffix(".seconds")
    total = (float(path.read_text()) if path.is_file() else 0.0) + seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{total:.1f}\n")
    return round(total, 1)


def _say(message: str) -> None:
    print(message, flush=True)


def run_study(plan: StudyPlan, claims: list[Claim], runs_root: Path, records_root: Path,
              max_minutes: float | None = None, train=subprocess_train, say=_say) -> int:
    """Train what the claims need and is not finished, seed by seed (every arm of seed 0
    first, so a partial study already holds complete pairs). Returns 0 when all is done, 75
    when the time budget ran out (run again to continue), 2 for a changed recipe, 1 for a run
    that failed for another reason. A diverged run is recorded as a result and not retried."""
    from powergrad.training.rundir import RunDirError, check_same_recipe

    deadline = time.monotonic() + max_minutes * 60 if max_minutes is not None else None
    arms = plan.arms_for(claims)
    order = [(arm, seed) for seed in sorted({s for a in arms for s in a.seeds})
             for arm in arms if seed in arm.seeds]
    try:  # every drift is found before anything trains
        for arm, seed in order:
            check_record(arm, seed, runs_root, records_root)
            check_same_recipe(runs_root / arm.name / f"s{seed}", run_recipe(arm, seed, runs_root))
    except (StudyError, RunDirError) as err:
        say(f"study: {err}")
        return 2
    for index, (arm, seed) in enumerate(order, 1):
        name, state = run_name(arm, seed), run_state(arm, seed, runs_root, records_root)
        where = f"[{index}/{len(order)}] {name}"
        if state in ("done", "diverged"):
            record = records_root / arm.name / f"s{seed}"
            if state == "done" and not (record / "final.json").is_file():
                copy_record(arm, seed, runs_root, records_root)
            say(f"{where}: {state}, skipped")
            continue
        left = deadline - time.monotonic() if deadline is not None else None
        if left is not None and left <= 0:
            say(f"study: time budget spent, {len(order) - index + 1} run(s) left; run the same "
                "command again to continue")
            return EXIT_PREEMPTED
        log_file = runs_root / arm.name / f"s{seed}.log"
        say(f"{where}: {'resuming' if state == 'partial' else 'training'} "
            f"(about {estimate_seconds(plan, arm, records_root) / 60:.1f} min; log {log_file})")
        command = train_command(arm, seed, runs_root)
        start = time.monotonic()
        code = train(command, log_file, left)
        info = {"command": " ".join(["powergrad", *command[3:]]), "exit_code": code,
                "wall_seconds": _add_wall_time(log_file, time.monotonic() - start),
                "digest": run_recipe(arm, seed, runs_root).digest()}
        if code == 0:
            record = copy_record(arm, seed, runs_root, records_root, info)
            final = read_json_record(record / "final.json")
            say(f"{where}: test top-1 {final['final_test_top1']:.2f} %, "
                f"{info['wall_seconds']:.0f} s")
        elif code == 1 and "diverged:" in log_tail(log_file, 5):
            copy_record(arm, seed, runs_root, records_root, {**info, "diverged": log_tail(
                log_file, 1)})
            say(f"{where}: diverged ({log_tail(log_file, 1)}); recorded as a result")
        elif code == EXIT_PREEMPTED:
            say(f"{where}: stopped with a checkpoint (time budget or SIGTERM); run the same "
                "command again to continue")
            return EXIT_PREEMPTED
        else:
            say(f"study: {name} failed with exit code {code}: {log_tail(log_file)}")
            return 2 if code == 2 else 1
    return 0


def status_lines(plan: StudyPlan, claims: list[Claim], runs_root: Path,
                 records_root: Path) -> list[str]:
    """Each claim's runs by state, and the estimated time of what is left."""
    lines, left_seconds, total_seconds = [], 0.0, 0.0
    for claim in claims:
        if claim.requires:
            lines.append(f"{claim.name}: not run here, needs {claim.requires}")
            continue
        counts: dict[str, int] = {}
        for arm in plan.arms_for([claim]):
            for seed in arm.seeds:
                state = run_state(arm, seed, runs_root, records_root)
                counts[state] = counts.get(state, 0) + 1
        lines.append(f"{claim.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    runs = left = 0
    for arm in plan.arms_for(claims):
        seconds = estimate_seconds(plan, arm, records_root)
        todo = sum(run_state(arm, s, runs_root, records_root) not in ("done", "diverged")
                   for s in arm.seeds)
        runs, left = runs + len(arm.seeds), left + todo
        total_seconds += seconds * len(arm.seeds)
        left_seconds += seconds * todo
    lines.append(f"{runs} runs, {left} left; estimated {total_seconds / 3600:.2f} h in all, "
                 f"{left_seconds / 3600:.2f} h left (recorded wall times where an arm has "
                 f"them, else the throughput in {plan.file}: {plan.throughput_note})")
    return lines
