"""`powergrad study PLAN.yaml`: train a plan's claims x arms x seeds in resumable pieces, then
write the report from the run records alone.

    powergrad study recipes/study/plan.yaml --status                 # done, left, hours
    powergrad study recipes/study/plan.yaml --claims pgt_bn --max-minutes 50   # a piece
    powergrad study recipes/study/plan.yaml --report-only            # the report alone
    powergrad study recipes/study/plan.yaml --slurm --sbatch "--time=4:00:00"  # one job array
    powergrad study recipes/study/plan.yaml --slurm --status         # each run's state

A finished run (final.json) is skipped, an interrupted one resumes from its checkpoints, and a
recipe changed after its run is refused (its old record would be reported under the new
settings). --max-minutes stops the current run with a checkpoint when the time is up (exit 75:
run the same command again). Runs train under --runs (checkpoints, event files, a log per
run); their small records go to --records, and the report to OUT.md and OUT/*.png. A plan
that names its own `runs`, `records` or `out` (recipes/study/imagenet_plan.yml) uses them where
the option is left at its default. --slurm submits the runs left as one SLURM job array
(powergrad/study/slurm.py), each element `--only ARM:SEED`.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from powergrad.commands.arguments import build_parser
from powergrad.errors import one_error_path

README = "results/README.md"  # the verdict table's place when --out is the default
REPORT_OPTIONS = ("records", "out", "readme")  # what the report is written from and to


def _default(option: str):
    return build_parser()[1]["study"].get_default(option)


def report_command(args: argparse.Namespace, folders: dict[str, str] | None = None) -> str:
    """The command that rewrites this report from the records alone: the plan, --report-only
    and the report's options that differ from their defaults (the plan's `folders` first)."""
    return shlex.join(["powergrad", "study", args.plan, "--report-only",
                       *_folder_options(args, REPORT_OPTIONS, folders or {})])


def _folder_options(args: argparse.Namespace, keys, folders: dict[str, str]) -> list[str]:
    """--KEY VALUE for the options among `keys` that differ from their defaults (the plan's
    `folders` first)."""
    options = [(f"--{key}", getattr(args, key)) for key in keys
               if getattr(args, key) != folders.get(key, _default(key))]
    return [part for option in options for part in option]


def _check_modes(args: argparse.Namespace) -> None:
    """The options that go together: --slurm submits (or with --status reads the queue),
    --only trains one run; the report is --report-only's either way."""
    from powergrad.study.plan import StudyError

    if args.slurm:
        clash = [name for name, given in (("--report-only", args.report_only),
                                          ("--no-report", args.no_report),
                                          ("--max-minutes", args.max_minutes is not None),
                                          ("--only", args.only is not None)) if given]
        if clash:
            raise StudyError("--slurm", "", f"not with {clash[0]}: --slurm submits the runs "
                             "(or with --status shows them); --report-only writes the report "
                             "once they are recorded, in a command of its own")
    else:
        given = [name for name, value in (("--sbatch", args.sbatch),
                                          ("--array-limit", args.array_limit)) if value]
        if given:
            raise StudyError(given[0], "", "only with --slurm")
    if args.only is not None and (args.status or args.report_only):
        raise StudyError("--only", "", "trains one run: not with --status or --report-only")


def _check_folder(plan, key: str, folder: str) -> None:
    """The plan's --out and --records folders are checked and made before any work, as the
    command line's are (cli.py); its runs folder is made by the runs."""
    from powergrad.study.plan import StudyError
    from powergrad.training.preflight import why_not_writable

    if key in ("out", "records"):
        why = why_not_writable(folder)
        if why:
            raise StudyError(plan.file, key, f"{folder}: {why}")
        Path(folder).expanduser().mkdir(parents=True, exist_ok=True)


def main(args: argparse.Namespace) -> int:
    """The command through the one error path: a plan or record problem is one line, exit 2."""
    from powergrad.study.plan import StudyError
    from powergrad.training.rundir import RunDirError

    return one_error_path("powergrad study", lambda: _main(args),
                          expected=(StudyError, RunDirError))


def _main(args: argparse.Namespace) -> int:
    from powergrad.study.plan import load_plan
    from powergrad.study.runner import run_study
    from powergrad.study.status import status_lines
    from powergrad.system.exit_codes import EXIT_PREEMPTED

    _check_modes(args)
    plan = load_plan(args.plan)
    claims = plan.select(args.claims.split(",") if args.claims else None)
    for key, folder in plan.folders.items():  # the plan's own, where the option is left out
        if getattr(args, key) == _default(key):
            setattr(args, key, folder)
            _check_folder(plan, key, folder)
    runs, records = Path(args.runs), Path(args.records)
    if args.slurm:
        return _slurm(args, plan, claims, runs, records)
    if args.status:
        print("\n".join(status_lines(plan, claims, runs, records)))
        return 0
    if args.only is not None:
        from powergrad.study.slurm import parse_only, step_launcher

        return run_study(plan, claims, runs, records, only=parse_only(plan, args.only),
                         launcher=step_launcher())
    code = 0
    if not args.report_only:
        code = run_study(plan, claims, runs, records, max_minutes=args.max_minutes)
        if code not in (0, EXIT_PREEMPTED):
            return code
    if not args.no_report:
        from powergrad.study.report import write_report

        readme = args.readme
        if readme is None and args.out == _default("out") and Path(README).is_file():
            readme = README
        readme = Path(readme) if readme else None
        # The whole plan, whatever --claims trained.
        md = write_report(plan, list(plan.claims.values()), records, Path(args.out),
                          report_command(args, plan.folders), readme=readme)
        print(f"wrote {md} and its plots in {args.out}/"
              + (f", and the verdict table in {readme}" if readme else ""), flush=True)
    return code



def _slurm(args: argparse.Namespace, plan, claims, runs: Path, records: Path) -> int:
    from powergrad.study import slurm

    if args.status:
        print("\n".join(slurm.slurm_status_lines(plan, claims, runs, records)))
        print(f"the report, once every run is recorded: {report_command(args, plan.folders)}")
        return 0
    options = slurm.sbatch_options(args.sbatch)
    code = slurm.submit_study(plan, claims, runs, records,
                              slurm.element_command(args.plan, runs, records), options,
                              args.array_limit)
    status = shlex.join(["powergrad", "study", args.plan, "--slurm", "--status",
                         *_folder_options(args, ("runs", "records"), plan.folders)])
    print(f"each run's state: {status}", flush=True)
    return code
