"""The study's PNGs, from the run records: per claim the paired test top-1 differences and the
mean test curves; a sweep's metrics against the swept value; ViT per-block profiles; collapsed
filters per conv layer."""
from __future__ import annotations

from pathlib import Path

from powergrad.config.loading import load_recipe
from powergrad.study.metrics import METRICS, block_values, layer_counts, metric_values
from powergrad.study.plan import Claim, StudyPlan
from powergrad.study.stats import mean_sd, paired_differences, t_interval


def claim_pngs(claim: Claim) -> list[str]:
    """The file names of the claim's PNGs, in the report's order."""
    return [f"{claim.name}{suffix}.png" for suffix, wanted in (
        ("", True), ("_sweep", bool(claim.sweep)), ("_blocks", claim.profiles),
        ("_layers", "collapsed_filters" in claim.expect)) if wanted]


def plot_claim(plan: StudyPlan, claim: Claim, records: dict, png_dir: Path) -> list[Path]:
    """The claim's PNGs (claim_pngs), written into png_dir; their paths."""
    from powergrad.report.plotting import pyplot

    plt = pyplot()
    seeds = plan.arms[claim.baseline].seeds
    paths = [png_dir / name for name in claim_pngs(claim)]
    fig, (ax_diff, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arm in enumerate(claim.arms):
        diffs = paired_differences("final_test_top1", records, arm, claim.baseline, seeds)
        ax_diff.plot([i] * len(diffs), diffs, "o", alpha=0.5, color="tab:blue")
        interval = t_interval(diffs) if diffs else None
        if interval and interval.low is not None:
            ax_diff.errorbar([i + 0.15], [interval.mean], color="black", capsize=4, fmt="s",
                             yerr=[[interval.mean - interval.low], [interval.high - interval.mean]])
    ax_diff.axhline(0, color="grey", lw=0.8)
    ax_diff.set_xlim(-0.5, len(claim.arms) - 0.5)
    ax_diff.set_xticks(range(len(claim.arms)), claim.arms, rotation=20, ha="right")
    ax_diff.set(ylabel="test top-1 difference to baseline (points)",
                title="paired by seed (dots), mean and 95 % t interval")
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
    draw = {"_sweep": _plot_sweep, "_blocks": _plot_blocks, "_layers": _plot_filter_layers}
    for path in paths[1:]:
        draw[path.stem[len(claim.name):]](plt, plan, claim, records, path)
    return paths


def _plot_filter_layers(plt, plan, claim, records, path: Path) -> Path:
    """Collapsed filters per conv layer at the end of training, mean over seeds, per arm."""
    fig, ax = plt.subplots(figsize=(12, 4))
    layers: list[str] = []
    for color, name in enumerate(claim.arm_names()):
        counts = [layer_counts(records[(name, s)]) for s in plan.arms[name].seeds
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
            profiles = [block_values(kind, records[(name, s)]) for s in plan.arms[name].seeds
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
