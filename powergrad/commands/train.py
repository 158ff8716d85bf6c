"""`powergrad train RECIPE.yaml [RECIPE.yaml ...] [key=value ...]`: validate every recipe first,
then train them one after the other, optionally ending with a comparison table and plot."""
from __future__ import annotations

import sys
from pathlib import Path

from powergrad.config.loading import RUN_RECIPE, RecipeError, load_recipe
from powergrad.config.schema import Recipe
from powergrad.system.distributed import LaunchError, batch_step_note, world_from_env
from powergrad.system.exit_codes import EXIT_DIVERGED
from powergrad.system.preemption import StopRequest
from powergrad.training.preflight import check_run_dirs, preflight


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """(recipe files, key=value settings); a run folder stands for its recipe.yaml."""
    recipes = [str(Path(i) / RUN_RECIPE) if Path(i).is_dir() else i
               for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return recipes, overrides


def checked_recipes(paths: list[str], overrides: list[str], world_size: int,
                    fast_dev_run: int = 0) -> list[Recipe]:
    """Every recipe loaded and checked, the files first, then data and machine, before any
    trains; RecipeError for the first that fails."""
    recipes = [load_recipe(p, overrides) for p in paths]
    for recipe in recipes:
        preflight(recipe, world_size)
    if not fast_dev_run:  # a fast dev run writes no run directory
        check_run_dirs(recipes)
    return recipes


def _train_or_exit_code(train, recipe: Recipe, stop):
    """The run's summary, or the exit code for how it stopped: 75 when preempted (SIGTERM:
    the checkpoint holds the place, run the same command again), 2 for a run directory or
    checkpoint that cannot take this run, 3 (EXIT_DIVERGED) for a diverged run. One line, no
    traceback."""
    from powergrad.data.imagefolder_checks import ImageDataError
    from powergrad.system.distributed import shutdown
    from powergrad.system.preemption import Preempted
    from powergrad.training.checkpoint import CheckpointError
    from powergrad.training.rundir import RunDirError
    from powergrad.training.step import NonFiniteError
    from powergrad.training.weights import WeightsError

    try:
        return train(recipe, stop=stop)
    except Preempted as stop:
        if world_from_env().is_main:
            print(stop, flush=True)
        code = stop.exit_code
    except LaunchError as err:  # every rank that sees it says so: rank 0 may be the one missing
        print(f"launch error: {err}", file=sys.stderr, flush=True)
        code = 2
    except (RunDirError, CheckpointError, WeightsError) as err:  # a lock, or a file
        if world_from_env().is_main:
            print(f"run error: {err}", file=sys.stderr, flush=True)
        code = 2
    except ImageDataError as err:  # found while training: the rank that read it says so
        print(f"data error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        code = 2
    except NonFiniteError as err:
        print(f"diverged: {err}", file=sys.stderr, flush=True)
        code = EXIT_DIVERGED
    shutdown()
    return code


def main(items: list[str], compare_name: str | None = None, fast_dev_run: int = 0,
         stop: StopRequest | None = None) -> int:
    """stop: the CLI's StopRequest, entered before its slow imports (SIGTERM/SIGUSR1 are then
    caught from the first moment: a job preempted while it checks its recipes or loads its
    data still stops with a checkpoint and exit 75); by default one covering this call."""
    if stop is not None:
        return _main(items, compare_name, fast_dev_run, stop)
    with StopRequest() as stop:
        return _main(items, compare_name, fast_dev_run, stop)


def _main(items: list[str], compare_name: str | None, fast_dev_run: int,
          stop: StopRequest) -> int:
    paths, overrides = split_items(items)
    if not paths:
        print("powergrad train: name at least one recipe file", file=sys.stderr)
        return 2
    try:
        world = world_from_env()  # torchrun's or srun's
    except LaunchError as err:
        print(f"launch error: {err}", file=sys.stderr)
        return 2
    if (note := batch_step_note()) is not None:
        print(f"note: {note}", flush=True)
    try:
        recipes = checked_recipes(paths, overrides, world.world_size, fast_dev_run)
    except RecipeError as err:  # every rank finds it; one line says it
        if world.is_main:
            print(f"recipe error: {err}", file=sys.stderr)
        return 2
    from powergrad.training.engine import train
    from powergrad.training.rundir import run_dir_for

    if compare_name:  # its folder is checked now, not after hours of training
        from powergrad.report.compare import out_path_for
        from powergrad.training.preflight import why_not_writable

        why = why_not_writable(out_path_for(compare_name, [run_dir_for(r) for r in recipes]
                                            ).parent)
        if why:
            if world.is_main:
                print(f"powergrad train: --compare {compare_name}: {why}", file=sys.stderr)
            return 2

    say = print if world.is_main else (lambda *a, **k: None)
    run_dirs = []
    for recipe in recipes:
        if fast_dev_run:
            say(f"== {recipe.source}: fast dev run, up to {fast_dev_run} step(s) and "
                f"{fast_dev_run} test batch(es), nothing saved", flush=True)
            outcome = _train_or_exit_code(
                lambda r, stop: train(r, max_steps=fast_dev_run, stop=stop), recipe, stop)
            if isinstance(outcome, int):
                return outcome
            summary = outcome
            say(f"== {recipe.source}: fast dev run OK: {summary['updates']} step(s), train loss "
                f"{summary['final_train_loss']:.4f}, test top-1 on {summary['eval_batches']} "
                f"batch(es) {summary['final_test_top1']:.2f} %", flush=True)
            continue
        say(f"== {recipe.source} -> {run_dir_for(recipe)}", flush=True)
        outcome = _train_or_exit_code(train, recipe, stop)
        if isinstance(outcome, int):
            return outcome
        summary = outcome
        run_dirs.append(summary["run_dir"])
        say(f"== {recipe.source}: final test top-1 {summary['final_test_top1']:.2f} %, "
              f"best {summary['best_test_top1']:.2f} % (epoch {summary['best_epoch']}), "
              f"{summary['train_seconds']:.0f} s of training in all", flush=True)
    from powergrad.system.distributed import shutdown
    shutdown()
    if compare_name and run_dirs and world.is_main:
        from powergrad.report.compare import main as compare_main
        from powergrad.report.compare import out_path_for
        return compare_main(run_dirs, out=out_path_for(compare_name, run_dirs),
                            command="powergrad train " + " ".join(items)
                            + f" --compare {compare_name}")
    return 0
