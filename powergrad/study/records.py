"""One run of a study: where it trains (RUNS/ARM/sS), what it trains (the arm's recipe with
its seed and folder), its state, and its record (RECORDS/ARM/sS): the small, committable files
of a finished or diverged run, which the report reads and nothing else.

A record holds final.json, summary.csv and recipe.yaml as the run wrote them, diagnostics.json
(the mean of the last TAIL_POINTS logged values of each PGT, GPAS, clipping and filter scalar,
from the run's event files) and the study's run.json (the command, its exit code, wall time
and recipe digest). Checkpoints and event files stay under RUNS.
"""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from powergrad.config.loading import load_recipe
from powergrad.config.schema import Recipe
from powergrad.report.events import TAIL_POINTS, read_scalars, tail_mean
from powergrad.study.plan import Arm, Claim, StudyError, StudyPlan

RECORD_FILES = ("final.json", "summary.csv", "recipe.yaml")
DIAGNOSTIC_PREFIXES = ("pgt/", "gpas/", "clip/", "filters/")


def run_name(arm: Arm, seed: int) -> str:
    return f"{arm.name}/s{seed}"


def run_dir(runs_root: Path, arm: Arm, seed: int) -> Path:
    return Path(runs_root) / arm.name / f"s{seed}"


def record_dir(records_root: Path, arm: Arm, seed: int) -> Path:
    return Path(records_root) / arm.name / f"s{seed}"


def run_settings(arm: Arm, seed: int, runs_root: Path) -> list[str]:
    return [f"train.seed={seed}", f"log.output={Path(runs_root) / arm.name}",
            f"log.experiment=s{seed}"]


def run_recipe(arm: Arm, seed: int, runs_root: Path) -> Recipe:
    return load_recipe(arm.recipe, run_settings(arm, seed, runs_root))


def run_state(arm: Arm, seed: int, runs_root: Path, records_root: Path) -> str:
    """done (a record or final.json), diverged (recorded as such), partial (checkpoints to
    resume from) or todo."""
    record, folder = record_dir(records_root, arm, seed), run_dir(runs_root, arm, seed)
    if (record / "final.json").is_file() or (folder / "final.json").is_file():
        return "done"
    if (record / "run.json").is_file():
        return "diverged"  # a run that stopped on non-finite values: a result, not retried
    if (folder / "last.pth").is_file() or any(folder.glob("step-*.pth")):
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
    record = record_dir(records_root, arm, seed)
    saved = next((record / n for n in ("final.json", "run.json") if (record / n).is_file()), None)
    if saved is None:
        return
    digest = read_json_record(saved).get("digest")
    now = run_recipe(arm, seed, runs_root).digest()
    if digest != now:
        raise StudyError(saved, "digest", f"got {digest!r}, but {arm.recipe} with seed {seed} "
                         f"now gives {now!r}: the recipe changed after this run. Delete "
                         f"{record} and {run_dir(runs_root, arm, seed)} to train it again "
                         "with the new settings, or give the changed recipe a new arm name")


def diagnostics(folder: Path) -> dict:
    """tail_mean of each PGT, GPAS, clipping and filter scalar of a run folder's event files."""

    try:
        series = read_scalars(folder)
    except FileNotFoundError:
        return {}
    return {tag: {"mean": tail_mean(points), "points": len(points[-TAIL_POINTS:]),
                  "last_step": points[-1][0]}
            for tag, points in sorted(series.items())
            if tag.startswith(DIAGNOSTIC_PREFIXES) and points}


def copy_record(arm: Arm, seed: int, runs_root: Path, records_root: Path,
                run_info: dict | None = None) -> Path:
    """The small files of a finished run, committable: no checkpoints, no event files."""
    folder, record = run_dir(runs_root, arm, seed), record_dir(records_root, arm, seed)
    record.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, record / name)
    diag = {"tail_points": TAIL_POINTS, "scalars": diagnostics(folder)}
    (record / "diagnostics.json").write_text(json.dumps(diag, indent=1) + "\n")
    if run_info is not None:
        (record / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
    return record


@dataclass
class Record:
    arm: str
    seed: int
    path: Path
    final: dict | None  # final.json; None for a diverged run
    history: list[dict]  # summary.csv rows, numbers as floats
    diag: dict[str, float]  # diagnostics.json: tag -> mean of the last logged points
    run: dict = field(default_factory=dict)  # run.json (absent for runs copied by hand)

    @property
    def diverged(self) -> bool:
        return self.final is None


def read_record(path: Path, arm: str, seed: int) -> Record | None:
    """A run's record, or None when it has none yet."""
    final_file, run_file = path / "final.json", path / "run.json"
    if not final_file.is_file() and not run_file.is_file():
        return None
    history = []
    if (path / "summary.csv").is_file():
        try:
            with open(path / "summary.csv", newline="") as f:
                history = [{k: float(v) for k, v in row.items() if v not in ("", None)}
                           for row in csv.DictReader(f)]
        except (ValueError, TypeError) as err:
            raise StudyError(path / "summary.csv", "", f"damaged record ({err}); delete its "
                             f"folder {path} to train that run again") from None
    diag = {}
    if (path / "diagnostics.json").is_file():
        scalars = read_json_record(path / "diagnostics.json").get("scalars", {})
        diag = {tag: entry["mean"] for tag, entry in scalars.items()}
    return Record(arm=arm, seed=seed, path=path,
                  final=read_json_record(final_file) if final_file.is_file() else None,
                  history=history, diag=diag,
                  run=read_json_record(run_file) if run_file.is_file() else {})


def read_records(plan: StudyPlan, claims: list[Claim], records_root: Path
                 ) -> dict[tuple[str, int], Record]:
    """(arm, seed) -> Record for every planned run of the claims that has one: a seed without
    a record yet is simply absent."""
    records = {}
    for arm in plan.arms_for(claims):
        for seed in arm.seeds:
            record = read_record(record_dir(records_root, arm, seed), arm.name, seed)
            if record is not None:
                records[(arm.name, seed)] = record
    return records
