"""The `powergrad` command line: every subcommand's arguments and its help (argparse), and what
to do after a bad argument. Parsing only: cli.py runs what was asked. Also the argparse types
the commands and tools share (`whole_number`, `number_in`), so a number out of range is refused
by the parser with the option's name, never accepted and misused."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from powergrad import __version__

# What to do after a bad argument, per subcommand: argparse names the problem, this the fix.
HINTS = {
    "train": "recipes are .yaml files and settings are key=value (e.g. train.epochs=1), in any "
             "order with the options; see `powergrad train --help`",
    "describe": "name one recipe .yaml file, then key=value settings if any; see "
                "`powergrad describe --help`",
    "compare": "name run folders (runs/<output>/<experiment>); see `powergrad compare --help`",
    "export": "name one run folder (runs/<output>/<experiment>); see `powergrad export --help`",
    "check": "`powergrad check` takes no arguments",
    "check-data": "name ImageFolder directories (root/<class>/<image>) or .beton files; see "
                  "`powergrad check-data --help`",
    "gpu-check": "`powergrad gpu-check` takes --workdir DIR, --out DIR and --recipe FILE; see "
                 "`powergrad gpu-check --help`",
    "torchrun": "powergrad torchrun [TORCHRUN OPTIONS] train RECIPE.yaml [key=value ...] "
                "(or validate SOURCE ...)",
    "study": "name one plan .yaml file (claims, arms, seeds); see `powergrad study --help`",
    "validate": "name a run folder, an export folder or a weights file (then --recipe), and "
                "key=value settings if any; see `powergrad validate --help`",
}


def whole_number(low: int = 0, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""
    span = f">= {low}" if high is None else f"from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {text!r}")
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {value}")
        return value
    parse.__name__ = "whole number"  # argparse names the type in its own messages
    return parse


def number_in(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in [low, high] (or (low, high] with low_open)."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text!r}")
        above = value > low if low_open else value >= low
        if not (above and value <= high):  # NaN fails both
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


_count = whole_number(0)


class _Parser(argparse.ArgumentParser):
    """argparse with a line saying what to do after its error message."""

    hint: str = ""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        hint = f"\n  {self.hint}" if self.hint else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


Runner = Callable[[argparse.Namespace], int]


def build_parser(runners: dict[str, Runner] | None = None,
                 ) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the parser, {subcommand: its parser}); with `runners` ({subcommand: what runs it},
    cli.py's), each subcommand's parse gives its runner as `func` (argparse's set_defaults)."""
    parser = _Parser(prog="powergrad", description="The `powergrad` command: check, check-data, "
                     "train, torchrun, describe, compare, validate, export, gpu-check, study.")
    parser.add_argument("--version", action="version", version=f"powergrad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    subs = {}

    subs["check"] = sub.add_parser(
        "check", help="verify the PGT gradient on this machine against the float64 closed form",
        description="Compare PowerGradCrossEntropy's logit gradient with the closed form "
                    "(softmax(alpha z) - q) / N evaluated in float64: every target kind, "
                    "batch sizes, alphas and loss scales in float32 and float64, and under "
                    "bf16 autocast and fp16 autocast with a GradScaler (on the CPU, and on "
                    "CUDA when a GPU is present). Exit 0 when every case is within its limit.")

    check_data = subs["check-data"] = sub.add_parser(
        "check-data", help="open every image of ImageFolder trees or .beton files; list the bad",
        description="Before a long job: check each ImageFolder tree's structure (class folders, "
                    "no stray or hidden-format files, no empty class) and open every image "
                    "(header, size, structure; a JPEG must not be cut short) in parallel "
                    "processes, with a progress bar; a .beton's layout and sidecar. Every bad "
                    "file is listed on a line of its own. Exit 0 when all is sound, 2 if not.")
    check_data.add_argument("paths", nargs="+", metavar="DIR|BETON")
    check_data.add_argument("--workers", type=_count, default=None, metavar="N",
                            help="processes that open images (default: one per CPU core; 0: "
                                 "this process only)")
    check_data.add_argument("--decode", action="store_true",
                            help="also decode every pixel: finds damage inside a JPEG's "
                                 "compressed data too, about 10x slower per process (results/"
                                 "bench_check_data.md)")

    gpu_check = subs["gpu-check"] = sub.add_parser(
        "gpu-check", help="run every GPU path for a few steps: a pass/fail table with numbers",
        description="On a GPU machine: PGT exactness under fp16 + GradScaler and bf16 "
                    "autocast, ResNet-50 steps through the engine, each loader feeding the GPU "
                    "(images/s, feed ratio), DDP over all GPUs, and the paper recipe's "
                    "GPU-hours. Without CUDA: the same rows in a reduced form on the CPU. "
                    "Exit 0 when no row fails.")
    gpu_check.add_argument("--workdir", default=None, metavar="DIR",
                           help="keep the synthetic JPEGs and .beton files here and reuse them "
                                "(default: a temporary folder, removed afterwards)")
    gpu_check.add_argument("--out", default=None, metavar="DIR",
                           help="also write the table to DIR/gpu_check.md and its rows to "
                                "DIR/gpu_check.json (default: print only)")
    gpu_check.add_argument("--recipe", default=None, metavar="RECIPE.yaml",
                           help="the ResNet-50 recipe the engine rows train (default: the "
                                "checkout's recipes/imagenet/resnet50_cosine_pgt.yaml)")

    train = subs["train"] = sub.add_parser(
        "train", help="train from recipe files",
        description="Train each RECIPE in turn, after checking all of them. key=value settings "
                    "(dotted keys, e.g. optim.lr=0.2 pgt.alpha=0.25) apply to every recipe; "
                    "recipes, settings and options may come in any order. A run writes to "
                    "LOG.OUTPUT/EXPERIMENT (the recipe's log section).")
    train.add_argument("items", nargs="+", metavar="RECIPE.yaml|RUN_DIR|key=value",
                       help="recipe files, or run folders (continued from their own "
                            "recipe.yaml), and dotted key=value settings")
    train.add_argument("--compare", metavar="NAME|PATH",
                       help="after training, write a table NAME.md and plot NAME.png of the runs: "
                            "a bare NAME goes beside the runs (in their LOG.OUTPUT folder), a "
                            "path (with a '/') goes where it says; default: no comparison")
    train.add_argument("--fast-dev-run", type=_count, default=0, metavar="N",
                       help="train N optimizer steps and evaluate N batches of the real data, "
                            "save nothing: a minute's check of the data path before a long job "
                            "(default: 0, a normal run)")

    subs["torchrun"] = sub.add_parser(
        "torchrun", help="torchrun with exit codes a job script can act on (75: preempted)",
        description="powergrad torchrun [TORCHRUN OPTIONS] train RECIPE.yaml [key=value ...] "
                    "(or validate SOURCE [...]): torchrun's own launcher and options, starting "
                    "`powergrad train` (or `validate`, every image scored once) on every "
                    "process. SIGTERM, SIGUSR1 and SIGUSR2 reach the workers, which save; the "
                    "launcher "
                    "then exits 75 (plain torchrun exits 1, and dies on SIGUSR1). torchrun's "
                    "options and the recipes are checked once before any worker starts (an "
                    "error: one line naming the option or key, exit 2); a worker's failure "
                    "prints one line naming the rank and exits with its code instead of "
                    "torchrun's traceback. OMP_NUM_THREADS is set from train.threads (else 1 "
                    "per process, as torchrun does, when a node runs several) unless already "
                    "set; torchrun's lines that repeat ours are left out.")

    describe = subs["describe"] = sub.add_parser(
        "describe", help="what a recipe will train, without loading data",
        description="Print the resolved recipe (with the file each value came from), the "
                    "model, parameter groups, clipping, batch arithmetic per world size, the lr "
                    "at key epochs and the epoch count, and write a PNG of lr and PGT alpha.")
    describe.add_argument("items", nargs="+", metavar="RECIPE.yaml|key=value")
    describe.add_argument("--png", default=None,
                          help="where to write the schedule plot (default: "
                               "LOG.OUTPUT/describe/NAME_schedule.png)")

    compare = subs["compare"] = sub.add_parser(
        "compare", help="table and plot of runs from their event files",
        description="One table row per run folder: final and best test top-1, final train "
                    "top-1 and loss, when a target accuracy was first reached, images/s, and the "
                    "paper's numbers when the recipe carries them. Runs that stopped early or "
                    "diverged are shown with what they have; missing values are marked.")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--target", type=number_in(0, 100), default=None,
                         help="test top-1 (%%) whose first crossing is reported (default: the "
                              "highest multiple of 0.5 %% that every run reached)")
    compare.add_argument("--out", default=None, metavar="PATH",
                         help="also write PATH.md and PATH.png (default: print the table only)")

    validate = subs["validate"] = sub.add_parser(
        "validate", help="test loss, top-1 and top-5 of trained weights, without training",
        description="Score a run folder's checkpoint (or its EMA), an export folder, or a "
                    "weights file in any common layout (give --recipe for those two) on the "
                    "recipe's evaluation data, or on --data, with the recipe's evaluation "
                    "transform (key=value settings change it, e.g. data.val_img_size=256). "
                    "Under torchrun every image is counted once. Prints one line, then the "
                    "JSON (or writes it to --out).")
    validate.add_argument("source", metavar="RUN_DIR|EXPORT_DIR|WEIGHTS")
    validate.add_argument("items", nargs="*", metavar="key=value")
    validate.add_argument("--checkpoint", choices=["best", "last"], default="last",
                          help="of a run folder: last.pth (the run's final weights, what its "
                               "last evaluation scored) or best.pth (default: last)")
    validate.add_argument("--ema", action="store_true", help="score the EMA weights")
    validate.add_argument("--recipe", default=None, metavar="RECIPE.yaml",
                          help="the recipe that built the weights (default: the run folder's "
                               "recipe.yaml)")
    validate.add_argument("--data", default=None, metavar="DIR|BETON",
                          help="score on this ImageFolder tree or .beton (default: the "
                               "recipe's evaluation data)")
    validate.add_argument("--out", default=None, metavar="FILE.json",
                          help="write the JSON here (default: print it)")

    export = subs["export"] = sub.add_parser(
        "export", help="a run's trained weights as timm-ready safetensors + config.json",
        description="Write RUN_DIR's weights as model.safetensors with timm's config.json "
                    "(architecture, model arguments, preprocessing). Plain timm models then load "
                    "with timm.create_model('local-dir:OUT', pretrained=True); models with the "
                    "suite's own layers (small stem, BlurPool, no-BN, GPAS) load with "
                    "powergrad.commands.export.load_exported(OUT).")
    export.add_argument("run", metavar="RUN_DIR")
    export.add_argument("--checkpoint", choices=["best", "last"], default="best",
                        help="best.pth (highest test top-1) or last.pth (default: best)")
    export.add_argument("--ema", action="store_true",
                        help="export the EMA weights (needs train.model_ema; default: the "
                             "trained weights themselves)")
    export.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: RUN_DIR/export, or RUN_DIR/export_ema)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace the files of an earlier export in the output folder")

    study = subs["study"] = sub.add_parser(
        "study", help="a plan's claims x arms x seeds: resumable runs, intervals and verdicts",
        description="Train every (arm, seed) the plan's claims need, once, each a `powergrad "
                    "train` that resumes where it stopped; then write the report (paired "
                    "differences with 95 % t intervals, a verdict per claim, plots) from the "
                    "run records alone. Exit 0 when all is done, 75 when --max-minutes ran out "
                    "(the same command continues).")
    study.add_argument("plan", metavar="PLAN.yaml",
                       help="the plan: claims, arms (recipe + seeds), the verdict's margin")
    study.add_argument("--claims", default=None, metavar="NAME[,NAME...]",
                       help="train only these claims (and the arms they need); the report "
                            "always covers the whole plan (default: all)")
    study.add_argument("--max-minutes", type=number_in(0, 1e9, low_open=True), default=None,
                       help="stop training after this many minutes, the current run with a "
                            "checkpoint, and exit 75: the same command continues (default: no "
                            "limit)")
    study.add_argument("--runs", default="runs/study", help="where runs train: checkpoints, "
                       "event files, logs (default: %(default)s)")
    study.add_argument("--records", default="results/study_runs", help="where each finished "
                       "run's small record is copied (default: %(default)s)")
    study.add_argument("--out", default="results/study",
                       help="the report: OUT.md, plots in OUT/ (default: %(default)s)")
    study.add_argument("--readme", default=None, help="also write the verdict table into this "
                       "markdown file, between its markers (default: results/README.md when "
                       "--out is the default and that file exists)")
    study_mode = study.add_mutually_exclusive_group()
    study_mode.add_argument("--status", action="store_true", help="print each claim's runs by "
                            "state and the time left; train nothing")
    study_mode.add_argument("--report-only", action="store_true",
                            help="write the report from the records; train nothing")
    study_mode.add_argument("--no-report", action="store_true", help="train, write no report")
    study.add_argument("--slurm", action="store_true",
                       help="submit every run not recorded, training or queued as one SLURM "
                            "job array through sbatch, its script in RUNS/slurm/; with "
                            "--status, each run as recorded, running, pending or failed (from "
                            "the records, squeue and sacct). --report-only writes the report "
                            "once the runs are recorded")
    study.add_argument("--sbatch", default=None, metavar='"OPTIONS"',
                       help='with --slurm: sbatch options for every element, e.g. '
                            '"--partition=gpu --gpus-per-task=1 --time=4:00:00" (default: '
                            "none, the cluster's own defaults)")
    study.add_argument("--array-limit", type=whole_number(1), default=None, metavar="N",
                       help="with --slurm: at most N elements run at once (--array=0-M%%N; "
                            "default: no limit)")
    study.add_argument("--only", default=None, metavar="ARM:SEED",
                       help="train this one run and copy its record, no report: what each "
                            "element of a --slurm array runs (inside a SLURM job, as a step: "
                            "srun --kill-on-bad-exit=1 powergrad train ...; default: every "
                            "run the claims need)")

    for name, sub_parser in subs.items():
        sub_parser.hint = HINTS[name]
        if runners is not None:
            sub_parser.set_defaults(func=runners[name])
    return parser, subs


def parse_args(argv: list[str], runners: dict[str, Runner] | None = None) -> argparse.Namespace:
    """Subcommand arguments in any order: options may come before, between or after the
    recipes and key=value settings (argparse's intermixed parsing, one subcommand at a time).
    With `runners`, `func` is the subcommand's (build_parser)."""
    parser, subs = build_parser(runners)
    if argv[:1] == ["torchrun"] and not {"-h", "--help"} & set(argv[1:2]):
        # torchrun's own options pass through unparsed, to the runner parse would have bound
        return argparse.Namespace(command="torchrun", launcher_args=argv[1:],
                                  func=subs["torchrun"].get_default("func"))
    if argv[:1] == ["study"]:
        argv = _glued(argv, "--sbatch")
    if argv and argv[0] in subs:
        args = subs[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # --help, --version, or an unknown/missing command


def _glued(argv: list[str], option: str) -> list[str]:
    """`OPTION VALUE` as `OPTION=VALUE`: argparse takes a lone value that starts with a dash
    (`--sbatch --time=1:00:00`, sbatch's own options) for an option of its own."""
    out, rest = [], list(argv)
    while rest:
        word = rest.pop(0)
        out.append(f"{word}={rest.pop(0)}" if word == option and rest else word)
    return out
