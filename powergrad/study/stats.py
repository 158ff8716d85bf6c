"""The study's statistics: mean and sample standard deviation, the paired difference of an arm
to its baseline with a two-sided Student's t interval (scipy.stats, the `study` extra), the
verdict rule that turns an interval into reproduces / does not reproduce / inconclusive, and
the stability verdict: how often an arm diverged against its baseline, by Fisher's exact test
(the hypergeometric sums computed here, in exact integers).

Pairs are by seed: the same seed gives the same initial weights and the same data order and
augmentation, so the difference of a pair removes what the seed alone decides. A diverged run
has no value: its pair is left out of the interval and counted in the stability verdict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from powergrad.study.metrics import metric_values

LEVEL = 0.95
VERDICTS = ("reproduces", "does not reproduce", "inconclusive at this scale")
STABILITY = ("diverges more often than the baseline", "diverges less often than the baseline",
             "no difference shown at this scale")


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
    left_out: int = 0  # seeds both have a record for, left out because a run diverged


def t_quantile(probability: float, df: int) -> float:
    """Student's t quantile (scipy.stats.t.ppf)."""
    try:
        from scipy.stats import t
    except ImportError:
        raise ImportError("the study's intervals need scipy's t distribution: pip install "
                          "'powergrad[study]' (or scipy)") from None
    return float(t.ppf(probability, df))


def t_interval(diffs: list[float], level: float = LEVEL) -> Interval:
    """Two-sided confidence interval of the mean paired difference from Student's t with
    n - 1 degrees of freedom: mean +- t((1 + level) / 2, n - 1) * sd / sqrt(n)."""
    mean, sd = mean_sd(diffs)
    if sd is None:
        return Interval(mean, None, None, len(diffs))
    half = t_quantile((1 + level) / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Interval(mean, mean - half, mean + half, len(diffs), sd)


def paired_differences(metric: str, records: dict, arm: str, baseline: str,
                       seeds: tuple[int, ...]) -> list[float]:
    """arm - baseline, seed by seed, over the seeds both have a value for."""
    own = metric_values(metric, records, arm, baseline, seeds)
    ref = metric_values(metric, records, baseline, baseline, seeds)
    return [own[s] - ref[s] for s in seeds if s in own and s in ref]


def paired(metric: str, records: dict, arm: str, baseline: str,
           seeds: tuple[int, ...]) -> Interval:
    """The arm's paired difference to the baseline over the seeds where both finished."""
    diffs = paired_differences(metric, records, arm, baseline, seeds)
    left_out = sum(1 for s in seeds if (arm, s) in records and (baseline, s) in records
                   and (records[(arm, s)].diverged or records[(baseline, s)].diverged))
    never = sum(d == math.inf for d in diffs)
    if never:
        return Interval(None, None, None, len(diffs), not_reached=never, left_out=left_out)
    interval = t_interval(diffs)
    interval.left_out = left_out
    return interval


def fisher_exact(k: int, n1: int, j: int, n2: int) -> float:
    """Two-sided p of Fisher's exact test for k of n1 against j of n2: with the margins fixed,
    the hypergeometric probability of every table no more likely than the observed one. The
    probabilities share the denominator C(n1 + n2, k + j), so their numerators are compared as
    exact integers (no floating-point tolerance)."""
    total = k + j
    weight = [math.comb(n1, x) * math.comb(n2, total - x)
              for x in range(max(0, total - n2), min(n1, total) + 1)]
    observed = math.comb(n1, k) * math.comb(n2, j)
    return float(Fraction(sum(w for w in weight if w <= observed), math.comb(n1 + n2, total)))


@dataclass
class Divergence:
    arm: int  # runs of the arm that diverged
    arm_n: int  # runs of the arm with a record
    base: int
    base_n: int

    @property
    def p(self) -> float:
        return fisher_exact(self.arm, self.arm_n, self.base, self.base_n)

    @property
    def difference(self) -> float:
        """arm's divergence rate - baseline's, in percentage points."""
        return 100 * (self.arm / self.arm_n - self.base / self.base_n)


def divergence(records: dict, arm: str, baseline: str, seeds: tuple[int, ...]
               ) -> Divergence | None:
    """How many of each one's recorded runs (of these seeds) diverged; None when none did or
    either has no record yet (nothing to compare)."""
    def count(name):
        runs = [records[(name, s)] for s in seeds if (name, s) in records]
        return sum(r.diverged for r in runs), len(runs)
    (k, n1), (j, n2) = count(arm), count(baseline)
    return Divergence(k, n1, j, n2) if k + j and n1 and n2 else None


def stability_verdict(d: Divergence, level: float = LEVEL) -> str:
    """More or less often than the baseline when Fisher's two-sided p is below 1 - level;
    otherwise no difference is shown (which is not a showing that there is none)."""
    if d.p >= 1 - level:
        return STABILITY[2]
    return STABILITY[0] if d.difference > 0 else STABILITY[1]


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
    left = (f"; {interval.left_out} pair(s) left out: a run diverged (the stability row)"
            if interval.left_out else "")
    return _why(interval, direction, margin) + left


def _why(interval: Interval, direction: str, margin: float) -> str:
    if interval.n == 0:
        return "no run recorded yet" if not interval.left_out else "no pair where both finished"
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
