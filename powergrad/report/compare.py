"""`powergrad compare RUN_DIR ...`: a markdown table and a PNG of runs, read from their
TensorBoard event files (and the recipe.yaml saved beside them, for the paper's numbers).

A run that stopped early, diverged or never logged still gets its row: what it has is shown,
what it lacks reads `n/a`, and a note column says why. Nothing depends on argument order.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import yaml

from powergrad.report.events import read_scalars
from powergrad.report.plotting import pyplot
from powergrad.training.runlog import RESULT_FIELDS, train_img_per_sec

MISSING = "n/a"


def _last(series, tag):
    return series[tag][-1][1] if series.get(tag) else None


def _best(series, tag):
    finite = [v for _, v in series.get(tag, []) if math.isfinite(v)]
    return max(finite) if finite else None


def _first_reaching(series, target: float):
    """(step, epoch) where eval/top1 first reaches `target`, or None."""
    epochs = dict(series.get("epoch/number", []))
    for step, value in series.get("eval/top1", []):
        if value >= target:
            return step, int(epochs.get(step, 0))
    return None


def _first_non_finite(series) -> tuple[str, int] | None:
    """The first (tag, step) whose value is NaN or infinite among the losses and accuracies."""
    hits = [(step, tag) for tag in ("train/loss", "epoch/train_loss", "eval/loss", "eval/top1")
            for step, value in series.get(tag, []) if not math.isfinite(value)]
    return (min(hits)[1], min(hits)[0]) if hits else None


def _img_per_sec(run_dir: Path, series) -> float | None:
    """The run's images/s as final.json and the epoch lines define it (train_img_per_sec):
    from final.json, else the epochs of summary.csv (a run still training), else the step
    logs' mean (a run without a finished epoch)."""
    final = _final_record(run_dir)
    rate = final.get("img_per_sec", final.get("mean_img_per_sec"))
    rate = rate if isinstance(rate, (int, float)) else None
    if rate is None and (run_dir / "summary.csv").exists():
        try:
            with open(run_dir / "summary.csv", newline="") as f:
                rate = train_img_per_sec(list(csv.DictReader(f)))
        except (ValueError, KeyError, TypeError):  # a damaged table: fall back to the events
            rate = None
    if rate is None or not math.isfinite(rate):
        rates = [v for _, v in series.get("perf/img_per_sec", []) if math.isfinite(v)]
        rate = sum(rates) / len(rates) if rates else None
    return rate


def _paper_numbers(recipe_file: Path) -> tuple[dict, str]:
    """(the recipe's `paper` numbers, a note when recipe.yaml is damaged) of a run folder."""
    if not recipe_file.exists():
        return {}, ""
    try:
        tree = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
        return (tree.get("paper") or {}) if isinstance(tree, dict) else {}, ""
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}, f"{recipe_file.name} is damaged (no paper numbers)"


def _final_record(run_dir: Path) -> dict:
    """final.json, or {} when it is missing or damaged (the event files still speak)."""
    try:
        record = json.loads((run_dir / "final.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def summarize(run_dir: str | Path) -> dict:
    """One run's row. Values it does not have are None; `note` says what is missing or
    what went wrong (empty for a finished, finite run)."""
    run_dir = Path(run_dir)
    try:
        series = read_scalars(run_dir)
        note = "" if series else "no readable scalars in its event files (not started, or damaged)"
    except FileNotFoundError:
        series, note = {}, "no TensorBoard event files (not started?)"
    paper, damaged = _paper_numbers(run_dir / "recipe.yaml")
    if series and not series.get("eval/top1"):
        note = "no finished epoch"
    if damaged:
        note = "; ".join(filter(None, [note, damaged]))
    bad = _first_non_finite(series)
    if bad:
        note = f"diverged: non-finite {bad[0]} at step {bad[1]}"
    elif series.get("numerics/non_finite_stop"):
        note = f"stopped: non-finite values at step {series['numerics/non_finite_stop'][-1][0]}"
    read = {"last": _last, "best": _best}
    return {
        "run": run_dir.name,
        **{name: read[which](series, tag) for name, (_, tag, which) in RESULT_FIELDS.items()},
        "img_per_sec": _img_per_sec(run_dir, series),
        "paper": paper,
        "note": note,
        "series": series,
    }


def _cell(value, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def default_target(rows: list[dict]) -> float | None:
    """The highest multiple of 0.5 % that every run with a finite test top-1 reached."""
    bests = [r["best_test_top1"] for r in rows if r["best_test_top1"] is not None]
    return math.floor(min(bests) * 2) / 2 if bests else None


def markdown_table(rows: list[dict], target: float | None) -> str:
    """One row per run; `target` is the test top-1 whose first crossing is reported."""
    with_paper = any(r["paper"] for r in rows)
    with_note = any(r.get("note") for r in rows)
    reach = f"epoch (step) to {target:.2f} %" if target is not None else "epoch (step) to target"
    head = ["run", "final test top-1", "best test top-1", "final train top-1",
            "final train loss", reach, "img/s"]
    head += ["paper train / test top-1"] if with_paper else []
    head += ["note"] if with_note else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        hit = _first_reaching(r["series"], target) if target is not None else None
        reached = (f"{hit[1]} ({hit[0]})" if hit else
                   "not reached" if target is not None and r["series"].get("eval/top1") else
                   MISSING)
        cells = [r["run"], _cell(r["final_test_top1"], ".2f"), _cell(r["best_test_top1"], ".2f"),
                 _cell(r["final_train_top1"], ".2f"), _cell(r["final_train_loss"], ".4f"),
                 reached, _cell(r["img_per_sec"], ".0f")]
        if with_paper:
            p = r["paper"]
            cells.append(f"{p.get('train_top1', '-')} / {p.get('test_top1', '-')}" if p else "-")
        if with_note:
            cells.append(r.get("note") or "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        s = r["series"]
        # a run shorter than log_interval has no step-level loss: plot its epoch losses
        loss = s.get("train/loss") or s.get("epoch/train_loss")
        if loss:
            ax_loss.plot(*zip(*loss), marker="o" if len(loss) < 20 else None, label=r["run"])
        if s.get("eval/top1"):
            ax_top1.plot(*zip(*s["eval/top1"]), marker="o", label=r["run"])
    ax_loss.set(xlabel="optimizer step", ylabel="train loss (cross-entropy)", yscale="log",
                title="train loss")
    ax_top1.set(xlabel="optimizer step", ylabel="test top-1 (%)", title="test top-1")
    for ax in (ax_loss, ax_top1):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def out_path_for(name: str, run_dirs: list[str | Path]) -> Path:
    """Where `train --compare NAME` writes: a bare NAME beside the runs (the folder that
    holds them all), a path with a separator (or absolute) exactly where it says."""
    if os.sep in name or (os.altsep and os.altsep in name):
        return Path(name)
    parents = [Path(d).parent for d in run_dirs]
    try:
        common = Path(os.path.commonpath(parents))
    except ValueError:  # relative and absolute folders mixed
        common = Path(os.path.commonpath([p.resolve() for p in parents]))
    return common / name


def main(runs: list[str], target: float | None = None, out: str | Path | None = None,
         command: str | None = None) -> int:
    absent = [r for r in runs if not Path(r).is_dir()]
    if absent:
        print(f"compare: {', '.join(absent)}: no such folder (name run folders, "
              "runs/<output>/<experiment>)", file=sys.stderr)
        return 2
    rows = [summarize(r) for r in runs]
    if not any(r["series"] for r in rows):
        print("compare: nothing to compare: " + "; ".join(f"{run}: {r['note']}" for run, r in
                                                        zip(runs, rows)), file=sys.stderr)
        return 2
    names = [r["run"] for r in rows]
    if len(set(names)) < len(names):  # e.g. one recipe over several seeds: add the parent
        for r, run in zip(rows, runs):
            r["run"] = f"{Path(run).parent.name}/{Path(run).name}"
    if target is None:  # the level every run reached: how fast did each get there?
        target = default_target(rows)
    table = markdown_table(rows, target)
    print(table)
    for r in rows:
        if r["note"]:
            print(f"compare: {r['run']}: {r['note']}", file=sys.stderr)
    if out:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        command = command or "powergrad compare " + " ".join(runs) + f" --out {out}"
        md, png = Path(f"{out_path}.md"), Path(f"{out_path}.png")
        md.write_text(f"# {out_path.name}\n\nCommand: `{command}`\n\n{table}\n\n"
                      f"![curves]({png.name})\n")
        plot(rows, png)
        print(f"wrote {md} and {png}")
    return 0

