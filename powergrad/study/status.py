"""What a study has done and has left, and how long a run takes, from measurement only.

A run's time is the median wall time of its arm's finished runs (run.json). An arm without one
is scaled from the finished runs of the arms with the same `cost` (the same model and machine):
their median seconds per training image times the images this arm's schedule trains, both
counted from the data set itself (after data.train_subset) times the epochs, cool-down
included. With neither, or when the data cannot be read, the time is unknown and said so.
"""
from __future__ import annotations

import functools
import math
import statistics
from pathlib import Path

from powergrad.config.loading import load_recipe
from powergrad.study.plan import Arm, Claim, StudyPlan
from powergrad.study.records import read_json_record, record_dir, run_state


def finished_wall_seconds(arm: Arm, records_root: Path) -> list[float]:
    """The recorded wall times of the arm's finished runs (diverged runs stopped early)."""
    walls = []
    for seed in arm.seeds:
        record = record_dir(records_root, arm, seed)
        if (record / "final.json").is_file() and (record / "run.json").is_file():
            wall = read_json_record(record / "run.json").get("wall_seconds")
            if isinstance(wall, (int, float)) and math.isfinite(wall) and wall > 0:
                walls.append(float(wall))
    return walls


def schedule_images(arm: Arm) -> int | None:
    """Training images over one run's schedule: the data's training images (the data set's own
    count, after data.train_subset) times the epochs, cool-down included; None when the data
    cannot be read here."""
    from powergrad.training.preflight import inspect_data

    recipe = load_recipe(arm.recipe)
    try:
        images = inspect_data(recipe).train_images
    except (OSError, ValueError):  # RecipeError and ImageDataError: no data to count
        return None
    return images * (recipe.train.epochs + recipe.sched.cooldown_epochs)


def estimate_seconds(plan: StudyPlan, arm: Arm, records_root: Path,
                     images=schedule_images) -> float | None:
    """One run's time in seconds, or None when nothing measured says (see the module)."""
    walls = finished_wall_seconds(arm, records_root)
    if walls:
        return statistics.median(walls)
    per_image = []
    for other in plan.arms.values():
        if other.cost != arm.cost or other.name == arm.name:
            continue
        walls = finished_wall_seconds(other, records_root)
        count = images(other) if walls else None
        per_image += [wall / count for wall in walls] if count else []
    own = images(arm) if per_image else None
    return statistics.median(per_image) * own if own else None


def status_lines(plan: StudyPlan, claims: list[Claim], runs_root: Path,
                 records_root: Path) -> list[str]:
    """Each claim's runs by state, and the estimated time of what is left."""
    lines = []
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
    runs = left = unknown_runs = unknown_left = 0
    total_seconds = left_seconds = 0.0
    unknown_arms, images = [], functools.cache(schedule_images)  # each data set read once
    for arm in plan.arms_for(claims):
        todo = sum(run_state(arm, s, runs_root, records_root) not in ("done", "diverged")
                   for s in arm.seeds)
        runs, left = runs + len(arm.seeds), left + todo
        seconds = estimate_seconds(plan, arm, records_root, images)
        if seconds is None:
            unknown_runs, unknown_left = unknown_runs + len(arm.seeds), unknown_left + todo
            unknown_arms.append(arm.name)
            continue
        total_seconds += seconds * len(arm.seeds)
        left_seconds += seconds * todo
    line = (f"{runs} runs, {left} left; estimated {total_seconds / 3600:.2f} h in all, "
            f"{left_seconds / 3600:.2f} h left (measured: the median wall time of each arm's "
            f"finished runs in {records_root}, else seconds per training image of the arms of "
            "its cost)")
    if unknown_arms:
        line += (f"; not counted, time unknown (no finished run of the arm or its cost, or no "
                 f"data to count): {unknown_runs} runs, {unknown_left} left, of "
                 f"{', '.join(unknown_arms)}")
    return lines + [line]
