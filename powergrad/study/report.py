"""The study's report, from the run records alone (RECORDS/ARM/sS: final.json, summary.csv,
recipe.yaml, diagnostics.json, run.json): per arm the mean and standard deviation over seeds,
per compared arm the paired difference to the baseline with a 95 % t interval, a verdict per
expected effect by a stated rule, and PNG plots.

Pairs are by seed: the same seed gives the same initial weights and the same data order and
augmentation (the Fashion-MNIST loader seeds both from train.seed), so the difference of a
pair removes what the seed alone decides.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from powergrad.study.runner import Claim, StudyError, StudyPlan, estimate_seconds, read_json_record

LEVEL = 0.95
NOT_REACHED = math.inf  # epochs_to_baseline of a seed that never reached the target


@dataclass
class Record:
    arm: str
    seed: int
    path: Path
    final: dict | None  # final.json; None for a diverged run
    history: list[dict]  # summary.csv rows, numbers as floats
    diag: dict[str, float]  # diagnostics.json: tag -> mean of the last logged points
    run: dict = field(default_factory=dict)  # run.json (absent for runs copied by hand)

    @property
    def diverged(self) -> bool:
        return self.final is None


def read_record(path: Path, arm: str, seed: int) -> Record | None:
    """A run's record, or None when it has none yet."""
    final_file, run_file = path / "final.json", path / "run.json"
    if not final_file.is_file() and not run_file.is_file():
        return None
    history = []
    if (path / "summary.csv").is_file():
        try:
            with open(path / "summary.csv", newline="") as f:
                history = [{k: float(v) for k, v in row.items() if v not in ("", None)}
                           for row in csv.DictReader(f)]
        except (ValueError, TypeError) as err:
            raise StudyError(path / "summary.csv", "", f"damaged record ({err}); delete its "
                             f"folder {path} to train that run again") from None
    diag = {}
    if (path / "diagnostics.json").is_file():
        scalars = read_json_record(path / "diagnostics.json").get("scalars", {})
        diag = {tag: entry["mean"] for tag, entry in scalars.items()}
    return Record(arm=arm, seed=seed, path=path,
                  final=read_json_record(final_file) if final_file.is_file() else None,
                  history=history, diag=diag,
                  run=read_json_record(run_file) if run_file.is_file() else {})


def read_records(plan: StudyPlan, claims: list[Claim], records_root: Path
                 ) -> dict[tuple[str, int], Record]:
    records = {}
    for arm in plan.arms_for(claims):
        for seed in arm.seeds:
            record = read_record(records_root / arm.name / f"s{seed}", arm.name, seed)
            if record is not None:
                records[(arm.name, seed)] = record
    return records


# --- metrics: one number per run (epochs_to_baseline also needs the seed's baseline run) ----


def _final(key):
    return lambda rec, base: rec.final.get(key) if rec.final else None


def _diag(tag):
    return lambda rec, base: rec.diag.get(tag)


def _blocks(kind: str, rec: Record) -> list[float]:
    """Per-block values in block order (tags gpas/KIND/blockNN, zero-padded)."""
    return [v for t, v in sorted(rec.diag.items()) if t.startswith(f"gpas/{kind}/block")]


def first_epoch_reaching(history: list[dict], target: float) -> float:
    """The first epoch (counted from 1) whose test top-1 is at least `target`."""
    for row in history:
        if row.get("eval_top1", -math.inf) >= target:
            return row["epoch"] + 1
    return NOT_REACHED


def _epochs_to_baseline(rec: Record, base: Record) -> float | None:
    if rec.final is None or base.final is None:
        return None
    return first_epoch_reaching(rec.history, base.final["final_test_top1"])


@dataclass(frozen=True)
class Metric:
    label: str
    value: object  # (record, the same seed's baseline record) -> float | None
    points: bool = False  # in top-1 percentage points: the plan's margin applies


METRICS = {
    "final_test_top1": Metric("final test top-1 (%)", _final("final_test_top1"), points=True),
    "best_test_top1": Metric("best test top-1 (%)", _final("best_test_top1"), points=True),
    "final_train_top1": Metric("final train top-1 (%)", _final("final_train_top1"), points=True),
    "final_train_loss": Metric("final train cross-entropy", _final("final_train_loss")),
    "logit_norm": Metric("mean logit L2 norm (last logged batches)", _diag("pgt/logit_norm")),
    "peak_block_var": Metric("peak residual-stream variance over blocks",
                             lambda rec, base: max(_blocks("var", rec), default=None)),
    "mean_block_grad_norm": Metric("mean per-block gradient norm", lambda rec, base: (
        sum(g) / len(g) if (g := _blocks("grad_norm", rec)) else None)),
    "collapsed_filters": Metric("conv filters below 1 % of their initial norm (last logged "
                                "batches, powergrad/training/filters.py)",
                                _diag("filters/collapsed_total")),
    "epochs_to_baseline": Metric("epochs to the baseline's final test top-1",
                                 _epochs_to_baseline),
}


def metric_values(metric: str, records: dict, arm: str, baseline: str,
                  seeds: tuple[int, ...]) -> dict[int, float]:
    """seed -> value for the runs that have one (diverged and missing runs left out)."""
    out = {}
    for seed in seeds:
        rec, base = records.get((arm, seed)), records.get((baseline, seed))
        if rec is None or (metric == "epochs_to_baseline" and base is None):
            continue
        value = METRICS[metric].value(rec, base)
        if value is not None and not math.isnan(value):
            out[seed] = float(value)
    return out


# --- statistics ---------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); sd is None below two values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Interval:
    mean: float | None
    low: float | None
    high: float | None
    n: int
    sd: float | None = None
    not_reached: int = 0  # epochs_to_baseline: seeds where the arm never got there


def t_interval(diffs: list[float], level: float = LEVEL) -> Interval:
    """Two-sided confidence interval of the mean paired difference from Student's t with
    n - 1 degrees of freedom: mean +- t((1 + level) / 2, n - 1) * sd / sqrt(n)."""
    try:
        from scipy.stats import t
    except ImportError:
        raise ImportError("the study's intervals need scipy's t distribution: pip install "
                          "scipy (the package's test extra has it)") from None
    mean, sd = mean_sd(diffs)
    if sd is None:
        return Interval(mean, None, None, len(diffs))
    half = t.ppf((1 + level) / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Interval(mean, mean - half, mean + half, len(diffs), sd)


def paired(metric: str, records: dict, arm: str, baseline: str,
           seeds: tuple[int, ...]) -> Interval:
    """The arm's paired difference to the baseline over the seeds both have."""
    own = metric_values(metric, records, arm, baseline, seeds)
    ref = metric_values(metric, records, baseline, baseline, seeds)
    common = [s for s in seeds if s in own and s in ref]
    diffs = [own[s] - ref[s] for s in common]
    never = sum(d == math.inf for d in diffs)
    if never:
        return Interval(None, None, None, len(diffs), not_reached=never)
    return t_interval(diffs)


VERDICTS = ("reproduces", "does not reproduce", "inconclusive at this scale")


def verdict(interval: Interval, direction: str, margin: float) -> str:
    """The rule, with (low, high) the 95 % interval of the paired difference (arm - baseline):
    - higher: reproduces if low > 0; does not reproduce if high <= margin (no gain as large as
      the margin is left); else inconclusive.
    - lower: the mirror image (reproduces if high < 0; does not if low >= -margin).
    - no_gain: reproduces if high <= margin; does not reproduce if low > 0; else inconclusive.
    Fewer than two pairs give no interval: inconclusive. epochs_to_baseline with seeds that
    never reached the target: does not reproduce when at most half reached it, else
    inconclusive."""
    if interval.not_reached:
        reached = interval.n - interval.not_reached
        return VERDICTS[1] if reached <= interval.n / 2 else VERDICTS[2]
    if interval.low is None:
        return VERDICTS[2]
    low, high = interval.low, interval.high
    if direction == "higher":
        return VERDICTS[0] if low > 0 else VERDICTS[1] if high <= margin else VERDICTS[2]
    if direction == "lower":
        return VERDICTS[0] if high < 0 else VERDICTS[1] if low >= -margin else VERDICTS[2]
    if direction == "no_gain":
        return VERDICTS[0] if high <= margin else VERDICTS[1] if low > 0 else VERDICTS[2]
    raise ValueError(f"direction: got {direction!r}; expected higher, lower or no_gain")


def why(interval: Interval, direction: str, margin: float) -> str:
    """The verdict rule's reason in words, for the README's verdict table."""
    if interval.n == 0:
        return "no run recorded yet"
    if interval.not_reached:
        return (f"{interval.n - interval.not_reached} of {interval.n} seeds reached the "
                "baseline's accuracy")
    if interval.low is None:
        return "one seed pair: no interval"
    low, high = interval.low, interval.high
    if low == high == 0.0:
        return "every seed pair gave the same value: no difference to explain"
    if direction == "no_gain":
        return ("the interval's upper end is within the margin" if high <= margin else
                "the interval lies above 0: a gain" if low > 0 else
                "the interval reaches past the margin and below 0")
    if direction == "higher" and low > 0 or direction == "lower" and high < 0:
        return f"the interval lies {'above' if direction == 'higher' else 'below'} 0"
    if direction == "higher" and high <= margin or direction == "lower" and low >= -margin:
        return "the interval rules out an effect as large as the margin"
    return "the interval spans 0 and the margin: more seeds or a longer schedule needed"


def regime(plan: StudyPlan, claim: Claim, records: dict) -> str:
    base = plan.arms[claim.baseline]
    train = metric_values("final_train_top1", records, base.name, base.name, base.seeds)
    mean, _ = mean_sd(list(train.values()))
    if mean is None:
        return "not measured"
    kind = "fits its training set" if mean >= plan.fits_at else "under-fits"
    return f"{kind} (baseline train top-1 {mean:.2f} %)"


# --- the markdown -------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean_sd_text(values: list[float], digits: int) -> str:
    mean, sd = mean_sd(values)
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _interval_text(interval: Interval, digits: int) -> str:
    if interval.not_reached:
        return (f"not reached in {interval.not_reached} of {interval.n} seeds, "
                f"n = {interval.n}")
    if interval.mean is None:
        return "not measured"
    if interval.low is None:
        return f"{interval.mean:+.{digits}f} (n = 1, no interval)"
    return (f"{interval.mean:+.{digits}f} [{interval.low:+.{digits}f}, "
            f"{interval.high:+.{digits}f}], n = {interval.n}")


def _digits(metric: str) -> int:
    return 3 if metric in ("final_train_loss",) else 2


def comparisons(plan: StudyPlan, claims: list[Claim], records: dict):
    """(claim, arm, metric, direction, interval, margin) for every expected effect of every
    measured claim: what both verdict tables are made of."""
    for claim in claims:
        if claim.requires:
            continue
        seeds = plan.arms[claim.baseline].seeds
        for arm in claim.arms:
            for metric, direction in claim.expect.items():
                interval = paired(metric, records, arm, claim.baseline, seeds)
                margin = plan.margin_points if METRICS[metric].points else 0.0
                yield claim, arm, metric, direction, interval, margin


def _verdict_text(interval: Interval, direction: str, margin: float) -> str:
    return verdict(interval, direction, margin) if interval.n else "not measured yet"


def verdict_rows(plan: StudyPlan, claims: list[Claim], records: dict) -> list[list[str]]:
    rows = [[claim.name, "-", "-", "-", "-", f"not measured: needs {claim.requires}",
             "not measured"] for claim in claims if claim.requires]
    for claim, arm, metric, direction, interval, margin in comparisons(plan, claims, records):
        rows.append([claim.name, regime(plan, claim, records), f"{arm} vs {claim.baseline}",
                     f"{metric} ({direction})", claim.paper_for(arm, metric),
                     _interval_text(interval, _digits(metric)),
                     _verdict_text(interval, direction, margin)])
    return _in_claim_order(rows, claims)


def _in_claim_order(rows: list[list[str]], claims: list[Claim]) -> list[list[str]]:
    order = {claim.name: i for i, claim in enumerate(claims)}
    return sorted(rows, key=lambda row: order[row[0]])  # stable: arms and metrics keep theirs


README_BEGIN = "<!-- study verdicts: written by tools/study.py, do not edit by hand -->"
README_END = "<!-- end of study verdicts -->"


def readme_verdicts(plan: StudyPlan, claims: list[Claim], records: dict, report: str,
                    command: str) -> list[str]:
    """The verdict table for results/README.md: each claim, the paper's number, ours with its
    interval, the verdict and the rule's reason."""
    rows = [[claim.name, "-", "-", "-", "not measured", f"needs {claim.requires}"]
            for claim in claims if claim.requires]
    for claim, arm, metric, direction, interval, margin in comparisons(plan, claims, records):
        rows.append([claim.name, f"{arm} vs {claim.baseline}: {metric} ({direction})",
                     claim.paper_for(arm, metric), _interval_text(interval, _digits(metric)),
                     _verdict_text(interval, direction, margin),
                     why(interval, direction, margin)])
    rows = _in_claim_order(rows, claims)
    return [README_BEGIN, "", f"From `{report}` (regime, runs and plots there), written by "
            f"`{command}`:", "",
            *_table(["claim", "comparison: metric (expected)", "paper",
                     "ours: paired difference [95 % CI]", "verdict", "why"], rows),
            "", README_END]


def update_readme(readme: Path, block: list[str]) -> None:
    """Replace the verdict block of `readme` (or append it under a heading)."""
    text = readme.read_text() if readme.exists() else ""
    new = "\n".join(block)
    if README_BEGIN in text and README_END in text:
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
        note = f"diverged: seed(s) {', '.join(map(str, diverged))}" if diverged else ""
        recipe = arm.recipe
        try:
            recipe = recipe.resolve().relative_to(md_dir.resolve().parent)
        except ValueError:
            pass
        rows.append([name, f"`{recipe}`", f"{len(have)} of {len(arm.seeds)}", *cells, note])
    lines += ["Mean ± sample standard deviation over seeds:", "", *_table(head, rows), ""]
    if "epochs_to_baseline" in claim.expect:
        lines += ["Epochs to the baseline's final test top-1, per seed (arm / baseline):", ""]
        for arm in claim.arms:
            per_seed = []
            for seed in plan.arms[claim.baseline].seeds:
                own = metric_values("epochs_to_baseline", records, arm, claim.baseline, (seed,))
                ref = metric_values("epochs_to_baseline", records, claim.baseline,
                                    claim.baseline, (seed,))
                if seed in own and seed in ref:
                    text = "never" if own[seed] == math.inf else f"{own[seed]:.0f}"
                    per_seed.append(f"seed {seed}: {text} / {ref[seed]:.0f}")
            lines.append(f"- {arm}: " + ("; ".join(per_seed) or "not measured yet"))
        lines.append("")
    if any(key[0] in claim.arm_names() for key in records):  # no empty plots
        for png in plot_claim(plan, claim, records, png_dir):
            lines += [f"![{claim.name}]({png.relative_to(md_dir)})", ""]
    return lines


def write_report(plan: StudyPlan, claims: list[Claim], records_root: Path, out: Path,
                 command: str, readme: Path | None = None) -> Path:
    """OUT.md and OUT/<claim>*.png from the records under records_root; with `readme`, its
    verdict table too."""
    records = read_records(plan, claims, records_root)
    md, png_dir = Path(f"{out}.md"), Path(out)
    png_dir.mkdir(parents=True, exist_ok=True)
    planned = [(a.name, s) for a in plan.arms_for(claims) for s in a.seeds]
    estimate = sum(estimate_seconds(plan, a) * len(a.seeds) for a in plan.arms_for(claims))
    walls = [records[k].run.get("wall_seconds") for k in planned if k in records]
    walls = [w for w in walls if isinstance(w, (int, float))]
    lines = [
        "# The seeded CPU-scale study of the PGT and GPAS claims", "",
        f"Command: `{command}`", "",
        f"Plan: `{plan.file}`. Records: `{records_root}`, {sum(k in records for k in planned)} "
        f"of the {len(planned)} planned runs. Every number below is computed from those "
        "records alone.", "",
        f"Budget: estimated {estimate / 3600:.2f} h for all planned runs on this 2-core "
        f"machine with nothing else running ({plan.throughput_note}); the {len(walls)} runs "
        f"recorded with their time took {sum(walls) / 3600:.2f} h of wall time.", "",
        "Statistics: for each arm, the mean and sample standard deviation over its seeds; for "
        "each compared arm, the paired difference to the baseline (arm - baseline, same seed: "
        "same initial weights, data order and augmentation), its mean, and a two-sided 95 % "
        "confidence interval from Student's t distribution with n - 1 degrees of freedom, "
        "mean ± t(0.975, n - 1) · sd / √n, over the n seeds both have.", "",
        f"Verdict rule (margin {plan.margin_points:g} top-1 points, 0 for other metrics): "
        "*higher* expected: reproduces if the interval lies above 0; does not reproduce if "
        "its upper end is at most the margin; otherwise inconclusive at this scale. *lower*: "
        "the mirror image. *no_gain* (the paper expects no effect): reproduces if the upper "
        "end is at most the margin, does not reproduce if the interval lies above 0. One pair "
        "gives no interval: inconclusive. Epochs to the baseline's accuracy with seeds that "
        "never got there: does not reproduce if at most half of the seeds got there, else "
        "inconclusive.", "",
        f"Regime rule: a claim's baseline fits its training set when its mean final train "
        f"top-1 (the running accuracy over its last epoch, under the recipe's augmentation) is "
        f"at least {plan.fits_at:g} %; otherwise it under-fits.", "",
        "## Verdicts", "",
        *_table(["claim", "regime", "comparison", "metric (expected)", "paper",
                 "ours: paired difference [95 % CI]", "verdict"],
                verdict_rows(plan, claims, records)), ""]
    for claim in claims:
        lines += claim_section(plan, claim, records, png_dir, md.parent)
    md.write_text("\n".join(lines))
    if readme is not None:
        report = os.path.relpath(md, readme.parent)
        update_readme(readme, readme_verdicts(plan, claims, records, report, command))
    return md


# --- plots ------------------------------------------------------------------------------------


def plot_claim(plan: StudyPlan, claim: Claim, records: dict, png_dir: Path) -> list[Path]:
    """The claim's PNGs: paired test top-1 differences and mean test curves; a sweep's metrics
    against the swept value; ViT per-block profiles."""
    from powergrad.report.compare import pyplot

    plt = pyplot()
    seeds = plan.arms[claim.baseline].seeds
    paths = [png_dir / f"{claim.name}.png"]
    fig, (ax_diff, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arm in enumerate(claim.arms):
        own = metric_values("final_test_top1", records, arm, claim.baseline, seeds)
        ref = metric_values("final_test_top1", records, claim.baseline, claim.baseline, seeds)
        diffs = [own[s] - ref[s] for s in seeds if s in own and s in ref]
        ax_diff.plot([i] * len(diffs), diffs, "o", alpha=0.5, color="tab:blue")
        interval = t_interval(diffs) if diffs else None
        if interval and interval.low is not None:
            ax_diff.errorbar([i + 0.15], [interval.mean], color="black", capsize=4, fmt="s",
                             yerr=[[interval.mean - interval.low], [interval.high - interval.mean]])
    ax_diff.axhline(0, color="grey", lw=0.8)
    ax_diff.set_xlim(-0.5, len(claim.arms) - 0.5)
    ax_diff.set_xticks(range(len(claim.arms)), claim.arms, rotation=20, ha="right")
    ax_diff.set(ylabel="test top-1 difference to baseline (points)",
                title=f"paired by seed (dots), mean and 95 % t interval")
    for color, name in enumerate(claim.arm_names()):
        curves = [records[(name, s)].history for s in plan.arms[name].seeds
                  if (name, s) in records and records[(name, s)].history]
        if curves:
            length = min(len(c) for c in curves)
            mean = [sum(c[e]["eval_top1"] for c in curves) / len(curves) for e in range(length)]
            ax_curve.plot(range(1, length + 1), mean, marker="o", color=f"C{color}",
                          label=f"{name}, {len(curves)} seed(s)")
    ax_curve.xaxis.get_major_locator().set_params(integer=True)
    ax_curve.set(xlabel="epoch", ylabel="test top-1 (%), mean over seeds", title="test top-1")
    for ax in (ax_diff, ax_curve):
        ax.grid(alpha=0.3)
    if ax_curve.lines:
        ax_curve.legend(fontsize=8)
    _save(fig, paths[0], plt)
    if claim.sweep:
        paths.append(_plot_sweep(plt, plan, claim, records, png_dir / f"{claim.name}_sweep.png"))
    if claim.profiles:
        paths.append(_plot_blocks(plt, plan, claim, records, png_dir / f"{claim.name}_blocks.png"))
    if "collapsed_filters" in claim.expect:
        paths.append(_plot_filter_layers(plt, plan, claim, records,
                                         png_dir / f"{claim.name}_layers.png"))
    return paths


def _layer_counts(rec: Record) -> dict[str, float]:
    """Conv layer -> collapsed filters (mean of the last logged points), in model order."""
    prefix = "filters/collapsed/"
    return {t[len(prefix):]: v for t, v in rec.diag.items() if t.startswith(prefix)}


def _plot_filter_layers(plt, plan, claim, records, path: Path) -> Path:
    """Collapsed filters per conv layer at the end of training, mean over seeds, per arm."""
    fig, ax = plt.subplots(figsize=(12, 4))
    layers: list[str] = []
    for color, name in enumerate(claim.arm_names()):
        counts = [_layer_counts(records[(name, s)]) for s in plan.arms[name].seeds
                  if (name, s) in records]
        counts = [c for c in counts if c]
        if not counts:
            continue
        layers = layers or list(counts[0])
        mean = [sum(c.get(layer, 0.0) for c in counts) / len(counts) for layer in layers]
        ax.plot(range(len(layers)), mean, marker="o", color=f"C{color}",
                label=f"{name}, {len(counts)} seed(s)")
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    ax.set(xlabel="conv layer", ylabel="filters below 1 % of their initial norm",
           title=f"{claim.name}: collapsed filters per layer, end of training (mean over seeds)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    _save(fig, path, plt)
    return path


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_sweep(plt, plan, claim, records, path: Path) -> Path:
    """Each metric against the swept setting for the compared arms; the baseline (which may
    not have the setting at all, e.g. no clipping) as a horizontal line."""
    from powergrad.config.loading import load_recipe

    metrics = ["final_test_top1", "final_train_top1", "final_train_loss", "logit_norm"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(16, 3.8))
    xs = {name: float(load_recipe(plan.arms[name].recipe).flat()[claim.sweep])
          for name in claim.arms}
    for ax, metric in zip(axes, metrics):
        points = []
        for name in claim.arm_names():
            seeds = plan.arms[name].seeds
            mean, sd = mean_sd(list(metric_values(metric, records, name, name, seeds).values()))
            if mean is None:
                continue
            if name == claim.baseline:
                ax.axhline(mean, color="grey", ls="--", label=f"{name} (mean)")
            else:
                points.append((xs[name], mean, sd or 0.0))
        points.sort()
        if points:
            ax.errorbar(*zip(*[(x, m) for x, m, _ in points]), yerr=[s for *_, s in points],
                        marker="o", capsize=3, label="arms (mean ± sd)")
            ax.set_xscale("log")
            ax.set_xticks([x for x, *_ in points], [f"{x:g}" for x, *_ in points])
            ax.minorticks_off()
        ax.set(xlabel=claim.sweep, ylabel=METRICS[metric].label)
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{claim.name}: mean ± sd over seeds")
    _save(fig, path, plt)
    return path


def _plot_blocks(plt, plan, claim, records, path: Path) -> Path:
    kinds = [("var", "residual-stream variance", "log"), ("grad_norm", "block gradient norm",
                                                          "log"), ("gate", "GPAS gate g", "linear")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (kind, label, scale) in zip(axes, kinds):
        for color, name in enumerate(claim.arm_names()):
            profiles = [_blocks(kind, records[(name, s)]) for s in plan.arms[name].seeds
                        if (name, s) in records]
            profiles = [p for p in profiles if p]
            if profiles:  # gate: one per block (gate mode "block", the study's recipes)
                depth = min(len(p) for p in profiles)
                mean = [sum(p[b] for p in profiles) / len(profiles) for b in range(depth)]
                ax.plot(range(depth), mean, marker="o", color=f"C{color}",
                        label=f"{name}, {len(profiles)} seed(s)")
        ax.set(xlabel="block", ylabel=label, yscale=scale if ax.lines else "linear",
               title=f"{label}, end of training (mean over seeds)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    _save(fig, path, plt)
    return path
