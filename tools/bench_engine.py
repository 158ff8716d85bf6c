"""Engine overhead: images per second of `powergrad.training.engine.train` against a bare PyTorch loop.

Both sides build the same objects from the same recipe with the suite's own builders (the
model from powergrad.training.models, the optimizer, schedule and loss from powergrad.training.builders, the
data from powergrad.data), seeded alike, so they train the same model on the same batches;
the bench checks that by comparing their mean training losses. The engine runs as a user's
`--fast-dev-run N` does (N optimizer steps, nothing written; its stdout and stderr are
captured, so progress shows as plain lines, not a bar); the bare side is a plain loop:
forward, loss, zero_grad, backward, optimizer step, schedule update.

The clock is the data itself: the training loader notes the time whenever it hands out a
batch, so the span from batch W to the last batch covers whole training steps of either side,
everything the loop does between batches included, and nothing of the set-up or evaluation.
Rounds interleave the two sides (who goes first alternates); the ratio engine/bare of images
per second is taken per round, and its median and range over rounds are reported, on wall
time and on this process's CPU time. Prints a markdown table; writes it only with --write.

    python tools/bench_engine.py --write results/bench_engine.md
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from timm.utils import random_seed

from powergrad.config.batching import plan_batch
from powergrad.config.loading import load_recipe
from powergrad.config.schema import Recipe
from powergrad.data import build_loaders
from powergrad.data.fashion_mnist import FashionMNISTLoader
from powergrad.system.distributed import DistInfo
from powergrad.training.builders import (build_optimizer, build_scheduler, build_train_loss,
                                         pick_device)
from powergrad.training.engine import train
from powergrad.training.models import build_model

DEMO_RECIPE = "recipes/fashion_mnist/resnet_baseline.yaml"
GOAL = 0.95  # engine images/s over bare images/s
# Wall time is what a user waits; CPU time (this process's) moves far less when other jobs
# take the cores of a shared machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@contextlib.contextmanager
def batch_clock(marks: list):
    """While active, every Fashion-MNIST training loader appends {clock: time} to `marks`
    as it hands out a batch. Patched on the class, so the engine's own loader is observed
    without touching the engine."""
    original = FashionMNISTLoader.__iter__

    def observed(loader):
        for batch in original(loader):
            if loader.train:
                marks.append({clock: read() for clock, read in CLOCKS.items()})
            yield batch

    FashionMNISTLoader.__iter__ = observed
    try:
        yield marks
    finally:
        FashionMNISTLoader.__iter__ = original


def run_engine(recipe: Recipe, steps: int) -> float:
    """Mean training loss of `steps` engine steps (fast_dev_run: nothing is written)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        summary = train(recipe, fast_dev_run=steps)
    return summary["final_train_loss"]


def run_bare(recipe: Recipe, steps: int) -> float:
    """The engine's set-up, then a plain loop; the mean training loss of `steps` steps."""
    cfg = recipe.train
    device = pick_device(cfg.device)
    plan = plan_batch(cfg.global_batch, cfg.batch_size, cfg.grad_accum_steps, 1)
    random_seed(cfg.seed, 0)
    model = build_model(recipe.model).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader, _ = build_loaders(
        recipe.data, batch_size=plan.micro_batch, eval_batch_size=cfg.eval_batch_size,
        seed=cfg.seed, device=device, dist_info=DistInfo(), channels_last=cfg.channels_last)
    optimizer = build_optimizer(recipe, model)
    scheduler, _ = build_scheduler(recipe, optimizer, len(train_loader))
    _, loss_fn = build_train_loss(recipe)

    model.train()
    train_loader.set_epoch(0)
    loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0
    for step, (images, labels) in zip(range(steps), train_loader):
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(num_updates=step + 1)
        loss_sum += loss.detach().double() * labels.shape[0]
        seen += labels.shape[0]
    return loss_sum.item() / seen


def seconds_per_step(run, recipe: Recipe, steps: int, skip: int) -> tuple[dict, float]:
    """({clock: seconds per step}, mean loss): the span from batch `skip` to batch steps - 1
    over the steps in between (the engine may fetch one batch more before it stops)."""
    with batch_clock([]) as marks:
        loss = run(recipe, steps)
    if len(marks) < steps:
        raise RuntimeError(f"the loader handed out {len(marks)} batches, expected {steps}")
    first, last = marks[skip], marks[steps - 1]
    return {clock: (last[clock] - first[clock]) / (steps - 1 - skip) for clock in CLOCKS}, loss


def measure(recipe: Recipe, steps: int, skip: int, rounds: int) -> tuple[dict, dict]:
    """Seconds per step, {clock: {side: [one per round]}}, and each side's mean loss."""
    sides = {"engine": run_engine, "bare": run_bare}
    for run in sides.values():  # warm-up: allocator, dispatch, file cache, lazy imports
        run(recipe, skip + 2)
    times = {clock: {side: [] for side in sides} for clock in CLOCKS}
    losses = {}
    for r in range(rounds):
        for side in list(sides) if r % 2 == 0 else list(reversed(sides)):
            per_step, losses[side] = seconds_per_step(sides[side], recipe, steps, skip)
            for clock in CLOCKS:
                times[clock][side].append(per_step[clock])
        print(f"round {r + 1}/{rounds}: ms per step " + "; ".join(
            f"{clock}: engine {times[clock]['engine'][-1] * 1e3:.1f}, "
            f"bare {times[clock]['bare'][-1] * 1e3:.1f}" for clock in CLOCKS), flush=True)
    return times, losses


def ratio_stats(times: dict[str, list[float]]) -> tuple[float, float, float]:
    """Median, min and max over rounds of engine images/s over bare images/s."""
    ratios = [bare / engine for engine, bare in zip(times["engine"], times["bare"])]
    return statistics.median(ratios), min(ratios), max(ratios)


def check_recipe(recipe: Recipe) -> None:
    """The bare loop mirrors a plain run: one process, no accumulation, mixup, clipping,
    EMA, AMP or compile, Fashion-MNIST data (the loader the clock observes)."""
    cfg, problems = recipe.train, []
    if recipe.data.dataset != "fashion_mnist":
        problems.append(f"data.dataset is {recipe.data.dataset!r}, expected fashion_mnist")
    if plan_batch(cfg.global_batch, cfg.batch_size, cfg.grad_accum_steps, 1).accum_steps != 1:
        problems.append("gradient accumulation is on, expected one micro-batch per step")
    if recipe.loss.mixup > 0 or recipe.loss.cutmix > 0:
        problems.append("mixup/cutmix is on, expected off")
    if recipe.clip.clip_mode != "none":
        problems.append(f"clip.clip_mode is {recipe.clip.clip_mode!r}, expected none")
    for key in ("model_ema", "torchcompile"):
        if getattr(cfg, key):
            problems.append(f"train.{key} is on, expected off")
    if cfg.amp_dtype != "float32":
        problems.append(f"train.amp_dtype is {cfg.amp_dtype!r}, expected float32")
    if problems:
        raise SystemExit(f"bench_engine: {recipe.source}: " + "; ".join(problems))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("recipe", nargs="?", default=DEMO_RECIPE, help="recipe file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides, as for powergrad train")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=3,
                        help="first steps of each run left out of the timing")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: this machine's second core is shared)")
    parser.add_argument("--write", metavar="PATH", help="also write the markdown table here")
    parser.add_argument("--note", default="", help="a sentence to add below the table")
    args = parser.parse_args()
    if "=" in args.recipe:  # only overrides given: they apply to the demo recipe
        args.overrides, args.recipe = [args.recipe, *args.overrides], DEMO_RECIPE
    if not 0 <= args.skip < args.steps - 1:
        parser.error(f"--skip {args.skip} --steps {args.steps}: expected 0 <= SKIP < STEPS - 1")
    if args.rounds < 1:
        parser.error(f"--rounds: got {args.rounds}, expected at least 1")
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, [f"train.threads={args.threads}", *args.overrides])
    check_recipe(recipe)
    # The engine evaluates after its steps; one batch keeps each call short (untimed anyway).
    recipe.data.eval_subset = recipe.train.eval_batch_size
    batch = recipe.train.batch_size
    load = os.getloadavg()[0]

    times, losses = measure(recipe, args.steps, args.skip, args.rounds)
    load = f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    if abs(losses["engine"] - losses["bare"]) > 1e-6 * abs(losses["bare"]):
        raise SystemExit(f"bench_engine: the two sides trained differently (mean loss engine "
                         f"{losses['engine']:.6f}, bare {losses['bare']:.6f}); the bare loop "
                         "no longer mirrors the engine's set-up")
    median = {clock: {side: statistics.median(v) for side, v in by_side.items()}
              for clock, by_side in times.items()}
    rows = [f"| {side} | {median['wall'][side] * 1e3:.1f} | {batch / median['wall'][side]:.0f} "
            f"| {median['cpu'][side] * 1e3:.1f} | {batch / median['cpu'][side]:.0f} |"
            for side in ("bare", "engine")]
    ratios = {clock: ratio_stats(times[clock]) for clock in CLOCKS}
    timed_steps = args.steps - 1 - args.skip
    command = "python " + shlex.join(sys.argv)
    table = "\n".join([
        "# Engine overhead against a bare PyTorch loop",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, "
        f"load average {load}; torch {torch.__version__}, timm "
        f"{timm.__version__}; recipe `{args.recipe}`"
        + (f" with {' '.join(args.overrides)}" if args.overrides else "")
        + f", batch {batch}; {args.steps} steps per run, {timed_steps} timed "
        f"(steps {args.skip + 1}-{args.steps - 1}); {args.rounds} interleaved rounds.",
        "",
        "| side | wall ms per step | images/s (wall) | CPU ms per step | images/s (CPU) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "| engine/bare images per second | median | range over rounds | goal |",
        "|---|---|---|---|",
        *(f"| {clock} time | {ratios[clock][0]:.3f} | {ratios[clock][1]:.3f} - "
          f"{ratios[clock][2]:.3f} | >= {GOAL} "
          f"({'met' if ratios[clock][0] >= GOAL else 'NOT met'}) |" for clock in CLOCKS),
        "",
        "A step's time runs from one batch leaving the training loader to the next, so it "
        "holds everything either loop does per step (data, forward, backward, optimizer, "
        "schedule, and the engine's running sums, progress and periodic diagnostics) and "
        "nothing of set-up or evaluation. Times are medians over rounds; a ratio is the median "
        "of per-round ratios, each round running both sides back to back, and its range the "
        "smallest and largest of them. CPU time is this process's own, which other jobs on a "
        "shared machine disturb far less than wall time. Both sides trained the same model on "
        f"the same batches: their mean training losses over {args.steps} steps agree "
        f"({losses['engine']:.6f} and {losses['bare']:.6f}).",
    ] + (["", args.note] if args.note else []))
    print(table)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(table + "\n")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
