"""The metrics a claim can expect something of: one number per run, read from its record
(final.json, summary.csv, diagnostics.json; powergrad/study/records.py). epochs_to_baseline
also needs the same seed's baseline run. A record is anything with `final` (final.json or
None for a diverged run), `history` (summary.csv rows) and `diag` (tag -> mean of the last
logged points)."""
from __future__ import annotations

import math
from dataclasses import dataclass

NOT_REACHED = math.inf  # epochs_to_baseline of a seed that never reached the target


def _final(key):
    return lambda rec, base: rec.final.get(key) if rec.final else None


def _diag(tag):
    return lambda rec, base: rec.diag.get(tag)


def block_values(kind: str, rec) -> list[float]:
    """Per-block values in block order (tags gpas/KIND/blockNN, zero-padded)."""
    return [v for t, v in sorted(rec.diag.items()) if t.startswith(f"gpas/{kind}/block")]


def layer_counts(rec) -> dict[str, float]:
    """Conv layer -> collapsed filters (mean of the last logged points), in model order."""
    prefix = "filters/collapsed/"
    return {t[len(prefix):]: v for t, v in rec.diag.items() if t.startswith(prefix)}


def _evaluations(history: list[dict]) -> list[tuple[float, float]]:
    """(epochs trained, test top-1) of each evaluation: epoch e's evaluation comes after e + 1
    epochs of training."""
    return [(row["epoch"] + 1, row["eval_top1"]) for row in history
            if math.isfinite(row.get("eval_top1", math.nan)) and "epoch" in row]


def epochs_reaching(history: list[dict], target: float) -> float:
    """Epochs of training until test top-1 first reaches `target`, read on the straight line
    between the last evaluation below it and the first at or above it. Reached at the first
    evaluation: that evaluation's epoch (nothing before it is measured)."""
    below = None
    for epochs, top1 in _evaluations(history):
        if top1 >= target:
            if below is None:
                return epochs
            x0, y0 = below
            return x0 + (target - y0) / (top1 - y0) * (epochs - x0)
        below = (epochs, top1)
    return NOT_REACHED


def evaluation_spacing(histories: list[list[dict]]) -> float | None:
    """The widest gap, in epochs, between consecutive evaluations of these runs: the
    resolution of epochs_reaching (None without two evaluations)."""
    gaps = []
    for history in histories:
        epochs = [e for e, _ in _evaluations(history)]
        gaps += [b - a for a, b in zip(epochs, epochs[1:])]
    return max(gaps, default=None)


def _epochs_to_baseline(rec, base) -> float | None:
    if rec.final is None or base.final is None:
        return None
    return epochs_reaching(rec.history, base.final["final_test_top1"])


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
                             lambda rec, base: max(block_values("var", rec), default=None)),
    "mean_block_grad_norm": Metric("mean per-block gradient norm", lambda rec, base: (
        sum(g) / len(g) if (g := block_values("grad_norm", rec)) else None)),
    "collapsed_filters": Metric("conv filters below 1 % of their initial norm (last logged "
                                "batches, powergrad/training/filters.py)",
                                _diag("filters/collapsed_total")),
    "epochs_to_baseline": Metric("epochs to the baseline's final test top-1 (interpolated "
                                 "between evaluations)", _epochs_to_baseline),
}


def metric_values(metric: str, records: dict, arm: str, baseline: str,
                  seeds: tuple[int, ...]) -> dict[int, float]:
    """seed -> value for the finished runs that have one (diverged and missing runs left out:
    a diverged run's last logged values describe its failure, not its result); records maps
    (arm, seed) to a record."""
    out = {}
    for seed in seeds:
        rec, base = records.get((arm, seed)), records.get((baseline, seed))
        if rec is None or rec.final is None:
            continue
        if metric == "epochs_to_baseline" and (base is None or base.final is None):
            continue
        value = METRICS[metric].value(rec, base)
        if value is not None and not math.isnan(value):
            out[seed] = float(value)
    return out
