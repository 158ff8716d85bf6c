"""The `powergrad` command: check, train, compare."""
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
        return train_main(args.items, compare_name=args.compare)
    if args.command == "compare":
        from .compare import main as compare_main
        return compare_main(args.runs, target=args.target, out=args.out)
    return 2


if __name__ == "__main__":
    sys.exit(main())
