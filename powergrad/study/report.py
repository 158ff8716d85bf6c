"""The study's report, from the plan and the run records alone (RECORDS/ARM/sS): OUT.md with
per arm the mean and standard deviation over seeds, per compared arm the paired difference to
the baseline with its 95 % t interval and the verdict (powergrad/study/stats.py), where a run
diverged the stability verdict (Fisher's exact test on the divergence counts), the plots
(powergrad/study/plots.py) in OUT/, and optionally the verdict table between its markers in a
README. Nothing else goes in: the same records give the same bytes. A planned seed without a
record is counted as missing and left out of every mean and pair.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from powergrad.study.metrics import METRICS, evaluation_spacing, metric_values
from powergrad.study.plan import Claim, StudyPlan
from powergrad.study.plots import plot_claim
from powergrad.study.records import read_records
from powergrad.study.stats import (LEVEL, Divergence, Interval, divergence, mean_sd, paired,
                                   stability_verdict, verdict, why)

README_BEGIN = "<!-- study verdicts: written by powergrad study, do not edit by hand -->"
README_END = "<!-- end of study verdicts -->"


def regime(plan: StudyPlan, claim: Claim, records: dict) -> str:
    base = plan.arms[claim.baseline]
    train = metric_values("final_train_top1", records, base.name, base.name, base.seeds)
    mean, _ = mean_sd(list(train.values()))
    if mean is None:
        return "not measured"
    kind = "fits its training set" if mean >= plan.fits_at else "under-fits"
    return f"{kind} (baseline train top-1 {mean:.2f} %)"


def _mean_sd_text(values: list[float], digits: int) -> str:
    mean, sd = mean_sd(values)
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _interval_text(interval: Interval, digits: int) -> str:
    left = (f"; {interval.left_out} pair(s) left out (diverged)" if interval.left_out else "")
    if interval.not_reached:
        return (f"not reached in {interval.not_reached} of {interval.n} seeds, "
                f"n = {interval.n}{left}")
    if interval.mean is None:
        return "no pair where both finished" + left if left else "not measured"
    if interval.low is None:
        return f"{interval.mean:+.{digits}f} (n = 1, no interval){left}"
    return (f"{interval.mean:+.{digits}f} [{interval.low:+.{digits}f}, "
            f"{interval.high:+.{digits}f}], n = {interval.n}{left}")


def _divergence_text(d: Divergence) -> str:
    return (f"diverged in {d.arm} of {d.arm_n} vs {d.base} of {d.base_n} seeds "
            f"({d.difference:+.1f} points)")


def _stability_why(d: Divergence) -> str:
    below = "below" if d.p < 1 - LEVEL else "not below"
    return f"Fisher's exact test, two-sided p = {d.p:.2g} ({below} {1 - LEVEL:.2g})"


def _digits(metric: str) -> int:
    return 3 if metric in ("final_train_loss",) else 2


STABILITY_METRIC = "diverged runs (stability)"


def comparisons(plan: StudyPlan, claims: list[Claim], records: dict):
    """(claim, arm, metric (expected), paper, ours, verdict, why) for every expected effect of
    every measured claim, and after an arm's effects its stability when a run of the arm or of
    its baseline diverged: what both verdict tables are made of."""
    for claim in claims:
        if claim.requires:
            continue
        seeds = plan.arms[claim.baseline].seeds
        for arm in claim.arms:
            for metric, direction in claim.expect.items():
                interval = paired(metric, records, arm, claim.baseline, seeds)
                margin = plan.margin_points if METRICS[metric].points else 0.0
                yield (claim, arm, f"{metric} ({direction})", claim.paper_for(arm, metric),
                       _interval_text(interval, _digits(metric)),
                       _verdict_text(interval, direction, margin),
                       why(interval, direction, margin))
            diverged = divergence(records, arm, claim.baseline, seeds)
            if diverged is not None:
                yield (claim, arm, STABILITY_METRIC, claim.paper_for(arm, "diverged"),
                       _divergence_text(diverged), stability_verdict(diverged),
                       _stability_why(diverged))


def _verdict_text(interval: Interval, direction: str, margin: float) -> str:
    measured = interval.n or interval.left_out
    return verdict(interval, direction, margin) if measured else "not measured yet"


def verdict_rows(plan: StudyPlan, claims: list[Claim], records: dict) -> list[list[str]]:
    rows = [[claim.name, "-", "-", "-", "-", f"not measured: needs {claim.requires}",
             "not measured"] for claim in claims if claim.requires]
    for claim, arm, metric, paper, ours, said, _ in comparisons(plan, claims, records):
        rows.append([claim.name, regime(plan, claim, records), f"{arm} vs {claim.baseline}",
                     metric, paper, ours, said])
    return _in_claim_order(rows, claims)


def _in_claim_order(rows: list[list[str]], claims: list[Claim]) -> list[list[str]]:
    order = {claim.name: i for i, claim in enumerate(claims)}
    return sorted(rows, key=lambda row: order[row[0]])  # stable: arms and metrics keep theirs


def _no_runs_yet(plan: StudyPlan, records_root: Path) -> str:
    return (f"No run of this plan has a record in `{records_root}` yet: the verdict table is "
            f"empty until runs exist (`powergrad study {plan.file} --status` lists the runs, "
            "what is left and its time).")


def readme_verdicts(plan: StudyPlan, claims: list[Claim], records: dict, report: str,
                    command: str, records_root: Path | None = None) -> list[str]:
    """The verdict table for a README: each claim, the paper's number, ours with its
    interval, the verdict and the rule's reason."""
    rows = [[claim.name, "-", "-", "-", "not measured", f"needs {claim.requires}"]
            for claim in claims if claim.requires]
    for claim, arm, metric, paper, ours, said, reason in comparisons(plan, claims, records):
        rows.append([claim.name, f"{arm} vs {claim.baseline}: {metric}", paper, ours, said,
                     reason])
    rows = _in_claim_order(rows, claims)
    table = (_table(["claim", "comparison: metric (expected)", "paper",
                     "ours: paired difference [95 % CI]", "verdict", "why"], rows)
             if records else [_no_runs_yet(plan, records_root or Path("RECORDS"))])
    return [README_BEGIN, "", f"From `{report}` (regime, runs and plots there), written by "
            f"`{command}`:", "", *table, "", README_END]


def update_readme(readme: Path, block: list[str]) -> None:
    """Replace the verdict block of `readme` (or append it under a heading)."""
    text = readme.read_text() if readme.exists() else ""
    new = "\n".join(block)
    if README_BEGIN in text and README_END in text.split(README_BEGIN, 1)[1]:
        head, rest = text.split(README_BEGIN, 1)
        text = head + new + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## The study: a verdict per claim\n\n" + new + "\n"
    readme.write_text(text)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def claim_section(plan: StudyPlan, claim: Claim, records: dict, png_dir: Path,
                  md_dir: Path) -> list[str]:
    lines = [f"## {claim.name}", "", f"**Claim:** {claim.statement}", "",
             f"**Source:** {claim.source}", ""]
    if claim.requires:
        return lines + [f"Not measured: this needs {claim.requires}.", ""]
    lines += [f"**Regime:** {regime(plan, claim, records)}.", ""]
    shown = ["final_test_top1", "final_train_top1", "final_train_loss", "logit_norm"]
    shown += ["peak_block_var", "mean_block_grad_norm"] if claim.profiles else []
    head = ["arm", "recipe", "seeds with a record", *[METRICS[m].label for m in shown], "note"]
    rows = []
    for name in claim.arm_names():
        arm = plan.arms[name]
        have = [s for s in arm.seeds if (name, s) in records]
        diverged = [s for s in have if records[(name, s)].diverged]
        cells = [_mean_sd_text(list(metric_values(m, records, name, name, arm.seeds).values()),
                               _digits(m)) for m in shown]
        note = (f"diverged: seed(s) {', '.join(map(str, diverged))} (left out of the means)"
                if diverged else "")
        rows.append([name, f"`{arm.recipe}`", f"{len(have)} of {len(arm.seeds)}", *cells, note])
    lines += ["Mean ± sample standard deviation over seeds:", "", *_table(head, rows), ""]
    if "epochs_to_baseline" in claim.expect:
        lines += [*_epochs_resolution(plan, claim, records), "",
                  "Epochs to the baseline's final test top-1, per seed (arm / baseline):", ""]
        for arm in claim.arms:
            per_seed = []
            for seed in plan.arms[claim.baseline].seeds:
                own = metric_values("epochs_to_baseline", records, arm, claim.baseline, (seed,))
                ref = metric_values("epochs_to_baseline", records, claim.baseline,
                                    claim.baseline, (seed,))
                if seed in own and seed in ref:
                    text = "never" if own[seed] == math.inf else f"{own[seed]:.2f}"
                    per_seed.append(f"seed {seed}: {text} / {ref[seed]:.2f}")
            lines.append(f"- {arm}: " + ("; ".join(per_seed) or "not measured yet"))
        lines.append("")
    if any(key[0] in claim.arm_names() for key in records):  # no empty plots
        for png in plot_claim(plan, claim, records, png_dir):
            lines += [f"![{claim.name}]({png.relative_to(md_dir)})", ""]
    return lines


def _epochs_resolution(plan: StudyPlan, claim: Claim, records: dict) -> list[str]:
    """The resolution of epochs_to_baseline, from the records' own evaluation epochs."""
    histories = [records[(name, s)].history for name in claim.arm_names()
                 for s in plan.arms[name].seeds if (name, s) in records]
    spacing = evaluation_spacing(histories)
    engine = "`powergrad train` evaluates once per epoch and has no setting for more often"
    where = (f"no record to read it from yet ({engine})" if spacing is None else
             f"the records evaluate test top-1 every {spacing:g} "
             f"epoch{'' if spacing == 1 else 's'} ({engine})")
    return [f"**Resolution:** {where}. The epoch at which a run reaches the baseline's final "
            "test top-1 is read on the straight line between the evaluation below it and the "
            "first at or above it, so its fraction of an epoch is interpolated, not measured; a "
            "run already there at its first evaluation shows that evaluation's epoch."]


def _header(plan: StudyPlan, claims: list[Claim], records: dict, records_root: Path,
            command: str) -> list[str]:
    planned = [(a.name, s) for a in plan.arms_for(claims) for s in a.seeds]
    walls = [records[k].run.get("wall_seconds") for k in planned if k in records]
    walls = [w for w in walls if isinstance(w, (int, float))]
    have = sum(k in records for k in planned)
    return [
        f"# The seeded study: {plan.description}" if plan.description else "# The seeded study",
        "", f"Command: `{command}`", "",
        f"Plan: `{plan.file}`. Records: `{records_root}`, {have} of the {len(planned)} planned "
        "runs. Every number below is computed from those records alone; a planned seed without "
        "a record is left out of every mean and pair.", "",
        f"Time: the {len(walls)} runs recorded with their wall time took "
        f"{sum(walls) / 3600:.2f} h; {len(planned) - have} planned runs have no record yet "
        "(`powergrad study PLAN --status` estimates them from the recorded times"
        + (", or from the plan's stated step times, with GPU-hours" if plan.costs else "")
        + ").", "",
        "Statistics: for each arm, the mean and sample standard deviation over its finished "
        "seeds; for each compared arm, the paired difference to the baseline (arm - baseline, "
        "same seed: same initial weights, data order and augmentation), its mean, and a "
        "two-sided 95 % confidence interval from Student's t distribution with n - 1 degrees "
        "of freedom, mean ± t(0.975, n - 1) · sd / √n, over the n seeds where both finished; a "
        "pair with a diverged run is left out of the interval and counted beside it. Where a "
        "run of an arm or of its baseline diverged, a stability row gives how many of each "
        "one's recorded seeds diverged and Fisher's exact test of the two proportions "
        "(two-sided: the hypergeometric probability of every table with the same margins no "
        "more likely than the observed one, computed in exact integers): the arm diverges "
        "more (or less) often than the baseline when p < 0.05, otherwise no difference is "
        "shown at this scale.", "",
        f"Verdict rule (margin {plan.margin_points:g} top-1 points, 0 for other metrics): "
        "*higher* expected: reproduces if the interval lies above 0; does not reproduce if "
        "its upper end is at most the margin; otherwise inconclusive at this scale. *lower*: "
        "the mirror image. *no_gain* (the paper expects no effect): reproduces if the upper "
        "end is at most the margin, does not reproduce if the interval lies above 0. One pair "
        "gives no interval: inconclusive. Epochs to the baseline's accuracy (interpolated "
        "between evaluations; each such claim states its resolution) with seeds that never got "
        "there: does not reproduce if at most half of the seeds got there, else "
        "inconclusive.", "",
        f"Regime rule: a claim's baseline fits its training set when its mean final train "
        f"top-1 (the running accuracy over its last epoch, under the recipe's augmentation) is "
        f"at least {plan.fits_at:g} %; otherwise it under-fits.", ""]


def write_report(plan: StudyPlan, claims: list[Claim], records_root: Path, out: Path,
                 command: str, readme: Path | None = None) -> Path:
    """OUT.md and OUT/<claim>*.png from the records under records_root; with `readme`, its
    verdict table too. `command` is the line the report names as the one that wrote it."""
    records = read_records(plan, claims, records_root)
    md, png_dir = Path(f"{out}.md"), Path(out)
    png_dir.mkdir(parents=True, exist_ok=True)
    table = (_table(["claim", "regime", "comparison", "metric (expected)", "paper",
                     "ours: paired difference [95 % CI]", "verdict"],
                    verdict_rows(plan, claims, records))
             if records else [_no_runs_yet(plan, records_root)])
    lines = [*_header(plan, claims, records, records_root, command), "## Verdicts", "", *table,
             ""]
    for claim in claims:
        lines += claim_section(plan, claim, records, png_dir, md.parent)
    md.write_text("\n".join(lines))
    if readme is not None:
        report = os.path.relpath(md, readme.parent)
        update_readme(readme, readme_verdicts(plan, claims, records, report, command,
                                              records_root))
    return md
