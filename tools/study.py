"""The seeded CPU-scale study of the PGT and GPAS claims: train each claim's arms over their
seeds, then write the report from the run records alone.

    python tools/study.py --status                          # what is done, what is left, hours
    python tools/study.py --claims pgt_bn --max-minutes 50  # a resumable piece, then the report
    python tools/study.py --report-only                     # the report from the records alone

A finished run (final.json) is skipped, an interrupted one resumes from its checkpoints, and
a recipe changed after its run is refused (its old record would be reported under the new
settings). --max-minutes stops the current run with a checkpoint when the time is up (exit
75: run the same command again). Runs train under --runs (checkpoints, event files, a log per
run); their small records go to --records, and the report to OUT.md and OUT/*.png.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from powergrad.errors import number_in, one_error_path
from powergrad.study.runner import StudyError, load_plan, run_study, status_lines


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default="tools/study_plan.yaml",
                        help="the study's plan: claims, arms (recipe + seeds), throughput "
                             "(default: %(default)s)")
    parser.add_argument("--claims", default=None, metavar="NAME[,NAME...]",
                        help="train only these claims (and the arms they need); the report "
                             "always covers the whole plan (default: all)")
    parser.add_argument("--max-minutes", type=number_in(0, 1e9, low_open=True), default=None,
                        help="stop training after this many minutes, the current run with "
                             "a checkpoint, and exit 75: the same command continues "
                             "(default: no limit)")
    parser.add_argument("--runs", default="runs/study",
                        help="where runs train: checkpoints, event files, logs "
                             "(default: %(default)s)")
    parser.add_argument("--records", default="results/study_runs",
                        help="where each finished run's small record is copied "
                             "(default: %(default)s)")
    parser.add_argument("--out", default="results/study",
                        help="the report: OUT.md, plots in OUT/ (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    parser.add_argument("--readme", default=None,
                        help="also write the verdict table into this markdown file, between "
                             "its markers (default: results/README.md when --out is the "
                             "default)")
    mode.add_argument("--status", action="store_true",
                      help="print each claim's runs by state and the time left; train nothing")
    mode.add_argument("--report-only", action="store_true",
                      help="write the report from the records; train nothing")
    mode.add_argument("--no-report", action="store_true", help="train, write no report")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan)
        claims = plan.select(args.claims.split(",") if args.claims else None)
    except StudyError as err:
        print(f"study: {err}", file=sys.stderr)
        return 2
    runs, records = Path(args.runs), Path(args.records)
    if args.status:
        print("\n".join(status_lines(plan, claims, runs, records)))
        return 0
    code = 0
    if not args.report_only:
        code = run_study(plan, claims, runs, records, max_minutes=args.max_minutes)
        if code not in (0, 75):
            return code
    if not args.no_report:
        from powergrad.study.report import write_report

        # The whole plan, whatever --claims trained, and the command that rewrites this
        # report from the records alone.
        options = [(flag, value) for flag, value, default in (
            ("--plan", args.plan, parser.get_default("plan")),
            ("--records", args.records, parser.get_default("records")),
            ("--out", args.out, parser.get_default("out")),
            ("--readme", args.readme, parser.get_default("readme"))) if value != default]
        command = shlex.join(["python", "tools/study.py", "--report-only",
                              *[part for option in options for part in option]])
        readme = args.readme or ("results/README.md" if args.out == parser.get_default("out")
                                 else None)
        readme = Path(readme) if readme else None
        md = write_report(plan, list(plan.claims.values()), records, Path(args.out), command,
                          readme=readme)
        print(f"wrote {md} and its plots in {args.out}/"
              + (f", and the verdict table in {readme}" if readme else ""))
    return code


def main(argv=None) -> int:
    """The tool with the one error path: an expected failure is one line and exit 2."""
    return one_error_path("study", lambda: _main(argv), expected=(StudyError,))


if __name__ == "__main__":
    sys.exit(main())
