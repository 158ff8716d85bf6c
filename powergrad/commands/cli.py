"""The `powergrad` command: parse (arguments.py), check what can be checked before any work,
and run the subcommand's runner (bound to its parser by argparse's set_defaults) through the
one error path."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from powergrad.commands.arguments import HINTS, parse_args
from powergrad.errors import one_error_path


def main(argv: list[str] | None = None) -> int:
    """Every command's one error path (errors.one_error_path): an expected failure has
    already printed its one line and returns its code (2 bad input, 3 divergence, 75
    preempted); an OS error on a path the user named becomes one line naming it; anything
    else is a bug, said as one."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv), RUNNERS)
    return one_error_path(f"powergrad {args.command}", lambda: _run(args))


# Where each command writes, given by options: (option, the folder it writes into: the parent
# of a file, or of a folder the command makes itself, so a refused command leaves nothing).
# One rule for all (README): each such folder is checked and, when missing, made before any
# work, as log.output is, so an hour of scoring never ends in "no such folder".
_OUTPUTS = {"compare": ["out"], "export": ["out"], "validate": ["out"], "describe": ["png"],
            "gpu-check": ["out", "workdir"], "study": ["out", "records"]}


def _unwritable_output(args: argparse.Namespace) -> str | None:
    """A message when a place an option names cannot be written, else None, its folders
    made: found before any work."""
    from powergrad.training.preflight import why_not_writable

    for option in _OUTPUTS.get(args.command, []):
        value = getattr(args, option, None)
        if not value:
            continue
        folder = Path(value).expanduser().parent
        why = why_not_writable(folder)
        if why:
            return f"powergrad {args.command}: --{option} {value}: {why}"
        folder.mkdir(parents=True, exist_ok=True)
    return None


def _run(args: argparse.Namespace) -> int:
    if (message := _unwritable_output(args)) is not None:
        print(message, file=sys.stderr)
        return 2
    return args.func(args)  # the subcommand's runner below, bound by parse_args (set_defaults)


# One runner per subcommand: what it checks of its arguments, then its module's main, imported
# only here so that a command never pays for another's imports (torch, timm).

def _check(args: argparse.Namespace) -> int:
    from powergrad.commands.check import main as check_main
    return check_main()


def _check_data(args: argparse.Namespace) -> int:
    from powergrad.commands.check_data import main as check_data_main
    return check_data_main(args.paths, workers=args.workers, decode=args.decode)


def _torchrun(args: argparse.Namespace) -> int:
    from powergrad.commands.launch import main as launch_main
    return launch_main(args.launcher_args)


def _gpu_check(args: argparse.Namespace) -> int:
    from powergrad.commands.gpu_check import main as gpu_check_main
    return gpu_check_main(args.workdir, out=args.out, recipe=args.recipe)


def _train(args: argparse.Namespace) -> int:
    if (bad := _not_recipes(args.items)) is not None:
        print(f"powergrad train: {bad}\n  {HINTS['train']}", file=sys.stderr)
        return 2
    if args.compare and args.fast_dev_run:
        print("powergrad train: --compare needs saved runs; --fast-dev-run saves nothing",
              file=sys.stderr)
        return 2
    from powergrad.system.preemption import StopRequest
    with StopRequest() as stop:  # before torch's import: a scheduler's signal is never lost
        from powergrad.commands.train import main as train_main
        return train_main(args.items, compare_name=args.compare,
                          fast_dev_run=args.fast_dev_run, stop=stop)


def _describe(args: argparse.Namespace) -> int:
    if (bad := _not_recipes(args.items)) is not None:
        print(f"powergrad describe: {bad}\n  {HINTS['describe']}", file=sys.stderr)
        return 2
    from powergrad.commands.describe import main as describe_main
    return describe_main(args.items, args.png)


def _compare(args: argparse.Namespace) -> int:
    from powergrad.report.compare import main as compare_main
    return compare_main(args.runs, target=args.target, out=args.out)


def _validate(args: argparse.Namespace) -> int:
    bad = [item for item in args.items if "=" not in item]
    if bad:
        print(f"powergrad validate: {bad[0]!r}: not a key=value setting\n  "
              f"{HINTS['validate']}", file=sys.stderr)
        return 2
    from powergrad.commands.validate import main as validate_main
    return validate_main(args.source, args.items, checkpoint=args.checkpoint, ema=args.ema,
                         recipe_path=args.recipe, data=args.data, out=args.out)


def _study(args: argparse.Namespace) -> int:
    from powergrad.commands.study import main as study_main
    return study_main(args)


def _export(args: argparse.Namespace) -> int:
    from powergrad.commands.export import main as export_main
    return export_main(args.run, checkpoint=args.checkpoint, ema=args.ema, out=args.out,
                       overwrite=args.overwrite)


RUNNERS = {"check": _check, "check-data": _check_data, "torchrun": _torchrun,
           "gpu-check": _gpu_check, "train": _train, "describe": _describe,
           "compare": _compare, "validate": _validate, "study": _study, "export": _export}


def _not_recipes(items: list[str]) -> str | None:
    """A message for an item that is neither key=value nor an existing file, else None:
    `train.epochs 3` (a space for '=') should not read as a missing recipe file. A run folder
    stands for its recipe.yaml."""
    for item in items:
        if "=" not in item and Path(item).is_dir():
            if not (Path(item) / "recipe.yaml").is_file():
                return f"{item}: a folder without a recipe.yaml, so not a run folder"
        elif "=" not in item and not Path(item).is_file():
            if Path(item).suffix in (".yaml", ".yml"):
                return f"{item}: recipe file not found"
            return f"{item!r}: not a recipe file and not a key=value setting"
    return None


if __name__ == "__main__":
    sys.exit(main())
