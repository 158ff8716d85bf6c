"""Engine overhead: images per second of `powergrad.training.engine.train` against a bare PyTorch loop.

Both sides build the same objects from the same recipe through the engine's own set-up
(powergrad.training.setup.build_training), seeded alike, so they train the same model on the same batches;
the bench checks that by comparing their mean training losses. The engine runs as a user's
`--fast-dev-run N` does (N optimizer steps, nothing written; its stdout and stderr are
captured, so progress shows as plain lines, not a bar); the bare side is a plain loop:
forward, loss, zero_grad, backward, optimizer step, schedule update.

The clock is the data itself: the training loader notes the time whenever it hands out a
batch, so the span from batch W to the last batch covers whole training steps of either side,
everything the loop does between batches included, and nothing of the set-up or evaluation.
Rounds interleave the two sides (who goes first alternates); the ratio engine/bare of images
per second is taken per round, and its median and range over rounds are reported, on wall
time and on this process's CPU time. Writes a JSON record and renders the markdown table
from it (tools/bench_record.py); --render redraws a table from a record without measuring.

    python tools/bench_engine.py --write results/bench_engine.md   # and results/bench_engine.json
    python tools/bench_engine.py --render results/bench_engine.json --write results/bench_engine.md
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time

import bench_record
import torch
from bench_record import add_output_arguments, new_record
from bench_timing import Spread, side_by_side

from powergrad.config.batching import plan_batch
from powergrad.config.loading import load_recipe
from powergrad.config.schema import Recipe
from powergrad.data.fashion_mnist import FashionMNISTLoader
from powergrad.training.engine import train
from powergrad.training.setup import build_training

TOOL, TOOL_PATH = "bench_engine", "tools/bench_engine.py"
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
    """Mean training loss of `steps` engine steps (a fast dev run, max_steps: nothing is written)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        summary = train(recipe, max_steps=steps)
    return summary["final_train_loss"]


def run_bare(recipe: Recipe, steps: int) -> float:
    """The engine's set-up (build_training), then a plain loop; the mean training loss of
    `steps` steps."""
    training = build_training(recipe)
    model, optimizer, scheduler = training.model, training.optimizer, training.scheduler
    loss_fn, train_loader, device = training.loss_fn, training.train_loader, training.device

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

    def progress(r: int, done: dict) -> None:
        print(f"round {r + 1}/{rounds}: ms per step " + "; ".join(
            f"{clock}: engine {done['engine'][-1][0][clock] * 1e3:.1f}, "
            f"bare {done['bare'][-1][0][clock] * 1e3:.1f}" for clock in CLOCKS), flush=True)

    done = side_by_side({side: (lambda run=run: seconds_per_step(run, recipe, steps, skip))
                         for side, run in sides.items()}, rounds, after_round=progress)
    times = {clock: {side: [per_step[clock] for per_step, _ in done[side]] for side in sides}
             for clock in CLOCKS}
    return times, {side: done[side][-1][1] for side in sides}


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


def summarise(record: dict, times: dict, losses: dict, batch: int) -> dict:
    """The record's rows from seconds per step {clock: {side: [per round]}}."""
    record["samples"] = {f"{clock}_s_per_step": by_side for clock, by_side in times.items()}
    spreads = {clock: {side: Spread.of(v) for side, v in by_side.items()}
               for clock, by_side in times.items()}
    record["rows"]["sides"] = [
        {"side": side, **{key: value for clock in CLOCKS for key, value in (
            (f"{clock}_ms", Spread.of([t * 1e3 for t in times[clock][side]]).to_json()),
            (f"{clock}_images_per_s", batch / spreads[clock][side].median))}}
        for side in ("bare", "engine")]
    # engine images/s over bare images/s, per round: bare seconds over engine seconds
    record["rows"]["ratios"] = [
        {"clock": clock, "goal": GOAL,
         "ratio": Spread.of_ratios(times[clock]["bare"], times[clock]["engine"]).to_json()}
        for clock in CLOCKS]
    record["facts"]["mean_train_loss"] = losses
    return record


def render(record: dict) -> str:
    m, p, rows = record["machine"], record["params"], record["rows"]
    load = m["load_average"]
    load = f"{load[0]:.2f} at the start" + (f", {load[1]:.2f} at the end" if len(load) > 1 else "")
    losses = record["facts"]["mean_train_loss"]
    lines = [
        "# Engine overhead against a bare PyTorch loop", "",
        f"Command: `{record['command']}`  ",
        f"Machine: {m['arch']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"load average {load}; torch {m['torch']}, timm {m['timm']}; recipe `{p['recipe']}`"
        + (f" with {' '.join(p['overrides'])}" if p["overrides"] else "")
        + f", batch {p['batch']}; {p['steps']} steps per run, {p['steps'] - 1 - p['skip']} timed "
        f"(steps {p['skip'] + 1}-{p['steps'] - 1}); {p['rounds']} interleaved rounds"
        + (f"; measured {record['date']}." if record.get("date") else "."), "",
        "| side | wall ms per step | images/s (wall) | CPU ms per step | images/s (CPU) |",
        "|---|---|---|---|---|",
        *(f"| {r['side']} | {r['wall_ms']['median']:.1f} | {r['wall_images_per_s']:.0f} "
          f"| {r['cpu_ms']['median']:.1f} | {r['cpu_images_per_s']:.0f} |" for r in rows["sides"]),
        "",
        "| engine/bare images per second | median | range over rounds | goal |",
        "|---|---|---|---|",
        *(f"| {r['clock']} time | {r['ratio']['median']:.3f} | {r['ratio']['low']:.3f} - "
          f"{r['ratio']['high']:.3f} | >= {r['goal']} "
          f"({'met' if r['ratio']['median'] >= r['goal'] else 'NOT met'}) |"
          for r in rows["ratios"]),
        "",
        "A step's time runs from one batch leaving the training loader to the next, so it "
        "holds everything either loop does per step (data, forward, backward, optimizer, "
        "schedule, and the engine's running sums, progress and periodic diagnostics) and "
        "nothing of set-up or evaluation. Times are medians over rounds; a ratio is the median "
        "of per-round ratios, each round running both sides back to back, and its range the "
        "smallest and largest of them. CPU time is this process's own. Both sides trained the "
        f"same model on the same batches: their mean training losses over {p['steps']} steps "
        f"agree ({losses['engine']:.6f} and {losses['bare']:.6f})." + spread_sentence(rows),
    ]
    return "\n".join(lines) + "\n"


def spread_sentence(rows: dict) -> str:
    """Which clock's per-round ratios spread less, from the ratio rows."""
    ranges = {r["clock"]: (r["ratio"]["low"], r["ratio"]["high"]) for r in rows["ratios"]}
    if not {"wall", "cpu"} <= set(ranges):
        return ""
    (c_lo, c_hi), (w_lo, w_hi) = ranges["cpu"], ranges["wall"]
    less = "less" if c_hi - c_lo < w_hi - w_lo else "no less"
    return (f" Here the CPU-time ratios spread {less} than the wall-time ones "
            f"({c_lo:.3f}-{c_hi:.3f} against {w_lo:.3f}-{w_hi:.3f}).")


def main(argv: list[str] | None = None) -> dict:
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
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if "=" in args.recipe:  # only overrides given: they apply to the demo recipe
        args.overrides, args.recipe = [args.recipe, *args.overrides], DEMO_RECIPE
    if not 0 <= args.skip < args.steps - 1:
        parser.error(f"--skip {args.skip} --steps {args.steps}: expected 0 <= SKIP < STEPS - 1")
    if args.rounds < 1:
        parser.error(f"--rounds: got {args.rounds}, expected at least 1")
    return bench_record.run(args, argv, TOOL, TOOL_PATH, measure_record, render)


def measure_record(args, command: str) -> dict:
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, [f"train.threads={args.threads}", *args.overrides])
    check_recipe(recipe)
    # The engine evaluates after its steps; one batch keeps each call short (untimed anyway).
    recipe.data.eval_subset = recipe.train.eval_batch_size
    batch = recipe.train.batch_size
    record = new_record(TOOL, command, {
        "recipe": args.recipe, "overrides": args.overrides, "batch": batch, "steps": args.steps,
        "skip": args.skip, "rounds": args.rounds}, threads=args.threads)
    times, losses = measure(recipe, args.steps, args.skip, args.rounds)
    if abs(losses["engine"] - losses["bare"]) > 1e-6 * abs(losses["bare"]):
        raise SystemExit(f"bench_engine: the two sides trained differently (mean loss engine "
                         f"{losses['engine']:.6f}, bare {losses['bare']:.6f}); the bare loop "
                         "no longer mirrors the engine's set-up")
    return summarise(record, times, losses, batch)


if __name__ == "__main__":
    main()
