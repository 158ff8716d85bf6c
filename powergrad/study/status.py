"""What a study has done and has left, and how long a run takes: measured where it can be.

A run's time is the median wall time of its arm's finished runs (run.json). An arm without one
is scaled from the finished runs of the arms with the same `cost` (the same model and machine):
their median seconds per training image times the images this arm's schedule trains, both
counted from the data set itself (after data.train_subset) times the epochs, cool-down
included. With neither, the plan's stated time per optimizer step for the cost (`costs`:
gpu-check's measurement, or a published figure until one exists) times the schedule's steps.
With none of these, or when the images cannot be counted, the time is unknown and said so.
A cost with its GPUs stated turns hours into GPU-hours.
"""
from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from powergrad.config.batching import plan_batch
from powergrad.config.loading import load_recipe
from powergrad.study.plan import Arm, Claim, StudyPlan
from powergrad.study.records import read_json_record, record_dir, run_state

IMAGENET_CLASSES = 1000


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


def epoch_images(arm: Arm, recipe=None) -> int | None:
    """Training images per epoch: the data set's own count (after data.train_subset); where
    the data is not on this machine, ImageNet-1k's count for a 1000-class model (the suite's
    ImageNet recipes); else None."""
    from powergrad.data.imagenet_archives import IMAGENET
    from powergrad.training.preflight import inspect_data

    recipe = recipe or load_recipe(arm.recipe)
    try:
        return inspect_data(recipe).train_images
    except (OSError, ValueError):  # RecipeError and ImageDataError: no data to count here
        if recipe.model.num_classes != IMAGENET_CLASSES:
            return None
    subset = recipe.data.train_subset
    return min(IMAGENET.train_images, subset) if subset else IMAGENET.train_images


def _epochs(recipe) -> int:
    return recipe.train.epochs + recipe.sched.cooldown_epochs


def schedule_images(arm: Arm) -> int | None:
    """Training images over one run's schedule: epoch_images times the epochs, cool-down
    included; None when the images cannot be counted."""
    recipe = load_recipe(arm.recipe)
    images = epoch_images(arm, recipe)
    return images * _epochs(recipe) if images is not None else None


def schedule_steps(arm: Arm, gpus: int = 1, images=epoch_images) -> int | None:
    """Optimizer steps of one run on `gpus` processes: each epoch's images over the images of
    one step (whole steps: the loaders drop the last partial batch), times the epochs."""
    per_epoch = images(arm)
    if per_epoch is None:
        return None
    recipe = load_recipe(arm.recipe)
    train = recipe.train
    step = plan_batch(train.global_batch, train.batch_size, train.grad_accum_steps, gpus)
    return max(1, per_epoch // step.global_batch) * _epochs(recipe)


@dataclass(frozen=True)
class Estimate:
    seconds: float | None  # one run's wall time
    basis: str  # "own runs", "cost runs", "stated step time" or "unknown"
    steps: int | None = None  # the schedule's steps, for the stated step time


def estimate(plan: StudyPlan, arm: Arm, records_root: Path, images=schedule_images,
             per_epoch=epoch_images) -> Estimate:
    """One run's time, and what it rests on (see the module)."""
    walls = finished_wall_seconds(arm, records_root)
    if walls:
        return Estimate(statistics.median(walls), "own runs")
    per_image = []
    for other in plan.arms.values():
        if other.cost != arm.cost or other.name == arm.name:
            continue
        walls = finished_wall_seconds(other, records_root)
        count = images(other) if walls else None
        per_image += [wall / count for wall in walls] if count else []
    own = images(arm) if per_image else None
    if own:
        return Estimate(statistics.median(per_image) * own, "cost runs")
    stated = plan.costs.get(arm.cost)
    steps = schedule_steps(arm, stated.gpus, per_epoch) if stated else None
    if steps:
        return Estimate(steps * stated.seconds, "stated step time", steps)
    return Estimate(None, "unknown")


def estimate_seconds(plan: StudyPlan, arm: Arm, records_root: Path,
                     images=schedule_images) -> float | None:
    """One run's time in seconds, or None when nothing measured or stated says."""
    return estimate(plan, arm, records_root, images).seconds


def status_lines(plan: StudyPlan, claims: list[Claim], runs_root: Path,
                 records_root: Path) -> list[str]:
    """Each claim's runs by state, the estimated time of what is left, and with the plan's
    costs stated, the GPU-hours per arm."""
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
    unknown_arms, gpu_lines, gpu_total, gpu_left = [], [], 0.0, 0.0
    # each data set read once
    images, per_epoch = functools.cache(schedule_images), functools.cache(epoch_images)
    for arm in plan.arms_for(claims):
        todo = sum(run_state(arm, s, runs_root, records_root) not in ("done", "diverged")
                   for s in arm.seeds)
        runs, left = runs + len(arm.seeds), left + todo
        guess = estimate(plan, arm, records_root, images, per_epoch)
        if guess.seconds is None:
            unknown_runs, unknown_left = unknown_runs + len(arm.seeds), unknown_left + todo
            unknown_arms.append(arm.name)
            continue
        total_seconds += guess.seconds * len(arm.seeds)
        left_seconds += guess.seconds * todo
        if arm.cost in plan.costs:
            gpus, hours = plan.costs[arm.cost].gpus, guess.seconds / 3600
            gpu_total, gpu_left = gpu_total + hours * gpus * len(arm.seeds), \
                gpu_left + hours * gpus * todo
            how = (f"{guess.steps} steps x {plan.costs[arm.cost].seconds:g} s"
                   if guess.steps else f"from {guess.basis}")
            gpu_lines.append(f"  {arm.name}: {len(arm.seeds)} runs x {hours:.3f} h ({how}) x "
                             f"{gpus} GPU(s) = {hours * gpus * len(arm.seeds):.2f} GPU-hours, "
                             f"{todo} run(s) left")
    line = (f"{runs} runs, {left} left; estimated {total_seconds / 3600:.2f} h in all, "
            f"{left_seconds / 3600:.2f} h left (the median wall time of each arm's finished "
            f"runs in {records_root}, else seconds per training image of the arms of its cost, "
            "else the plan's stated step time for its cost)")
    if unknown_arms:
        line += (f"; not counted, time unknown (no finished run of the arm or its cost and no "
                 f"stated step time, or no data to count): {unknown_runs} runs, {unknown_left} "
                 f"left, of {', '.join(unknown_arms)}")
    lines.append(line)
    if plan.costs:
        lines += [f"GPU-hours: {gpu_total:.2f} in all, {gpu_left:.2f} left (an arm's hours per "
                  "run x the GPUs of its cost):", *gpu_lines, "step times of the plan's costs:"]
        lines += [f"  {name}: {cost.seconds:g} s per step on {cost.gpus} GPU(s); {cost.source}"
                  for name, cost in plan.costs.items()]
    return lines
