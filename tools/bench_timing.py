"""Timing for the benchmarks in tools/ (they import it as a sibling; tests/test_bench_tools.py
checks it): cases measured side by side in rounds, and the median and spread of what they
measured.

A case is a callable that returns one measurement (seconds, a rate, a dict of clocks: the case
decides). `side_by_side` calls every case once per round, rotating who goes first, so a slow
spell of a shared machine hits every case alike; ratios are then taken within a round
(`Spread.of_ratios`). `seconds` times a plain callable; `op_seconds` times an op-level one with
`torch.utils.benchmark.Timer` (its warm-up, its thread setting, an accelerator synchronised
before the clock is read).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Spread:
    """The median of n measurements and their smallest and largest. `low`, `high` and `n` may
    be None where only a median is known (a table transcribed from an older report)."""

    median: float
    low: float | None = None
    high: float | None = None
    n: int | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("Spread.of: no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    @classmethod
    def of_ratios(cls, num: Sequence[float], den: Sequence[float]) -> Spread:
        """The spread of per-round ratios num[i] / den[i] (the two measured in one round)."""
        if len(num) != len(den):
            raise ValueError(f"Spread.of_ratios: {len(num)} rounds against {len(den)}")
        return cls.of([a / b for a, b in zip(num, den)])

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping) -> Spread:
        return cls(**data)

    def text(self, fmt: str = ".2f") -> str:
        """'median [low-high]', or the median alone where the spread is unknown."""
        if self.low is None or self.high is None:
            return format(self.median, fmt)
        return f"{self.median:{fmt}} [{self.low:{fmt}}-{self.high:{fmt}}]"


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round `round_index`: each round starts one case later, so no case always
    goes first (with two cases: alternating)."""
    shift = round_index % len(names) if names else 0
    return list(names[shift:]) + list(names[:shift])


def side_by_side(cases: Mapping[str, Callable[[], T]], rounds: int, *, warmup: int = 0,
                 first_round: int = 0, into: dict[str, list[T]] | None = None,
                 after_round: Callable[[int, dict[str, list[T]]], None] | None = None,
                 ) -> dict[str, list[T]]:
    """{case: [one measurement per round]}: `warmup` untimed calls of each case, then `rounds`
    rounds calling every case once in `rotated` order. `first_round` numbers the rounds (a
    caller interleaving several groups of cases passes its own round); `into` collects into an
    existing dict; `after_round(round, measurements)` runs after each round (progress)."""
    if rounds < 1:
        raise ValueError(f"side_by_side: rounds must be at least 1, got {rounds}")
    for case in cases.values():
        for _ in range(warmup):
            case()
    measured = {} if into is None else into
    for name in cases:
        measured.setdefault(name, [])
    for r in range(first_round, first_round + rounds):
        for name in rotated(list(cases), r):
            measured[name].append(cases[name]())
        if after_round is not None:
            after_round(r, measured)
    return measured


def seconds(fn: Callable[[], object], calls: int = 1,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of `fn` over `calls` calls in a row."""
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def calls_for(fns: Sequence[Callable[[], object]], target_s: float, probe: int = 3) -> int:
    """Calls per measurement so that the slowest of `fns` takes about `target_s` (timer
    overhead negligible); each fn is probed `probe` times."""
    slowest = max(seconds(fn, probe) for fn in fns)
    return max(1, round(target_s / max(slowest, 1e-9)))


def op_seconds(fn: Callable[[], object], calls: int, threads: int) -> Callable[[], float]:
    """A case for `side_by_side`: seconds per call of an op-level `fn`, `calls` calls timed by
    torch.utils.benchmark.Timer with `threads` torch threads."""
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return lambda: timer.timeit(calls).mean
