"""A run's TensorBoard scalars read back, and the one definition of "the last logged points"
that the study's records, its report and tools/plot_blocks.py use."""
from __future__ import annotations

from pathlib import Path

TAIL_POINTS = 5  # diagnostics: mean of the last logged points (one point is one log step)


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a run: tag -> [(step, value), ...] sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    if not any(run_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files (is it a run directory?)")
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    series = {}
    for tag in acc.Tags()["scalars"]:
        points = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run may repeat steps
        series[tag] = sorted(points.items())
    return series


def tail_mean(points: list[tuple[int, float]], k: int = TAIL_POINTS) -> float:
    """The mean of the last k logged (step, value) points of a scalar."""
    tail = [value for _, value in points[-k:]]
    return sum(tail) / len(tail)
