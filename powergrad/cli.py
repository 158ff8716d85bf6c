"""The `powergrad` command: check, train, describe, compare."""
from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="powergrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="verify the PGT gradient against its closed form")
    train = sub.add_parser("train", help="train from recipe files",
                           description="Train each RECIPE in turn; key=value overrides "
                                       "(dotted keys, e.g. optim.lr=0.2 pgt.alpha=0.25) "
                                       "apply to every recipe.")
    train.add_argument("items", nargs="+", metavar="RECIPE.yaml|key=value")
    train.add_argument("--compare", metavar="NAME",
                       help="after training, write results/NAME.md and NAME.png comparing the runs")
    train.add_argument("--fast-dev-run", type=int, default=0, metavar="N",
                       help="train N optimizer steps and evaluate N batches of the real data, "
                            "save nothing: a minute's check of the data path before a long job")
    describe = sub.add_parser(
        "describe", help="what a recipe will train, without loading data",
        description="Print the resolved recipe (with the file each value came from), the "
                    "model, parameter groups, clipping, batch arithmetic per world size, the lr "
                    "at key epochs and the epoch count, and write a PNG of lr and PGT alpha.")
    describe.add_argument("items", nargs="+", metavar="RECIPE.yaml|key=value")
    describe.add_argument("--png", default=None,
                          help="where to write the schedule plot (default: "
                               "LOG.OUTPUT/describe/NAME_schedule.png)")
    compare = sub.add_parser("compare", help="table and plot of runs from their event files")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--target", type=float, default=None,
                         help="test top-1 (%%) whose first crossing is reported")
    compare.add_argument("--out", default=None, help="write OUT.md and OUT.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "check":
        from .check import main as check_main
        return check_main()
    if args.command == "train":
        from .train import main as train_main
        return train_main(args.items, compare_name=args.compare,
                          fast_dev_run=args.fast_dev_run)
    if args.command == "describe":
        return _describe(args.items, args.png)
    if args.command == "compare":
        from .compare import main as compare_main
        return compare_main(args.runs, target=args.target, out=args.out)
    return 2


def _describe(items: list[str], png: str | None) -> int:
    from pathlib import Path

    from .recipe import RecipeError, load_recipe
    from .train import split_items

    paths, overrides = split_items(items)
    if len(paths) != 1:
        print("powergrad describe: name exactly one recipe file", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(paths[0], overrides)
    except RecipeError as err:
        print(f"recipe error: {err}", file=sys.stderr)
        return 2
    from .describe import default_png, describe

    print(describe(recipe, Path(png) if png else default_png(recipe)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
