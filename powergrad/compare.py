"""`powergrad compare RUN_DIR ...`: a markdown table and a PNG of runs, read from their
TensorBoard event files (and the recipe.yaml saved beside them, for the paper's numbers)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import yaml


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


def _last(series, tag):
    return series[tag][-1][1] if series.get(tag) else math.nan


def _first_reaching(series, target: float):
    """(step, epoch) where eval/top1 first reaches `target`, or None."""
    epochs = dict(series.get("epoch/number", []))
    for step, value in series.get("eval/top1", []):
        if value >= target:
            return step, int(epochs.get(step, 0))
    return None


def summarize(run_dir: str | Path) -> dict:
    series = read_scalars(run_dir)
    recipe_file = Path(run_dir) / "recipe.yaml"
    paper = (yaml.safe_load(recipe_file.read_text()) or {}).get("paper", {}) if recipe_file.exists() else {}
    rates = [v for _, v in series.get("perf/img_per_sec", [])]
    return {
        "run": Path(run_dir).name,
        "final_test_top1": _last(series, "eval/top1"),
        "best_test_top1": max((v for _, v in series.get("eval/top1", [])), default=math.nan),
        "final_train_top1": _last(series, "epoch/train_top1"),
        "final_train_loss": _last(series, "epoch/train_loss"),
        "img_per_sec": sum(rates) / len(rates) if rates else math.nan,
        "paper": paper or {},
        "series": series,
    }


def markdown_table(rows: list[dict], target: float) -> str:
    """One row per run; `target` is the test top-1 whose first crossing is reported."""
    with_paper = any(r["paper"] for r in rows)
    head = ["run", "final test top-1", "best test top-1", "final train top-1",
            "final train loss", f"epoch (step) to {target:.2f} %", "img/s"]
    if with_paper:
        head += ["paper train / test top-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        hit = _first_reaching(r["series"], target)
        reached = f"{hit[1]} ({hit[0]})" if hit else "not reached"
        cells = [r["run"], f"{r['final_test_top1']:.2f}", f"{r['best_test_top1']:.2f}",
                 f"{r['final_train_top1']:.2f}", f"{r['final_train_loss']:.4f}", reached,
                 f"{r['img_per_sec']:.0f}"]
        if with_paper:
            p = r["paper"]
            cells.append(f"{p.get('train_top1', '-')} / {p.get('test_top1', '-')}" if p else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        s = r["series"]
        if s.get("train/loss"):
            ax_loss.plot(*zip(*s["train/loss"]), label=r["run"])
        if s.get("eval/top1"):
            ax_top1.plot(*zip(*s["eval/top1"]), marker="o", label=r["run"])
    ax_loss.set(xlabel="optimizer step", ylabel="train loss (cross-entropy)", yscale="log",
                title="train loss")
    ax_top1.set(xlabel="optimizer step", ylabel="test top-1 (%)", title="test top-1")
    for ax in (ax_loss, ax_top1):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(runs: list[str], target: float | None = None, out: str | None = None,
         command: str | None = None) -> int:
    try:
        rows = [summarize(r) for r in runs]
    except FileNotFoundError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    names = [r["run"] for r in rows]
    if len(set(names)) < len(names):  # e.g. one recipe over several seeds: add the parent
        for r, run in zip(rows, runs):
            r["run"] = f"{Path(run).parent.name}/{Path(run).name}"
    if target is None:  # the level every run reached: how fast did each get there?
        target = math.floor(min(r["best_test_top1"] for r in rows) * 2) / 2
    table = markdown_table(rows, target)
    print(table)
    if out:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        command = command or "powergrad compare " + " ".join(runs) + f" --out {out}"
        out_path.with_suffix(".md").write_text(
            f"# {out_path.name}\n\nCommand: `{command}`\n\n{table}\n\n"
            f"![curves]({out_path.name}.png)\n")
        plot(rows, out_path.with_suffix(".png"))
        print(f"wrote {out_path.with_suffix('.md')} and {out_path.with_suffix('.png')}")
    return 0


def block_profile(series: dict, kind: str, last: int = 5) -> list[float]:
    """Per-block values of a ViT run's probe (kind 'var' or 'grad_norm'), each the mean of the
    last `last` logged points: index i holds block i."""
    tags = sorted(t for t in series if t.startswith(f"gpas/{kind}/block"))
    return [sum(v for _, v in series[t][-last:]) / len(series[t][-last:]) for t in tags]


def block_report(runs: list[str], out: str, command: str) -> None:
    """Markdown and PNG of residual-stream variance and gradient norm against depth."""
    plt = pyplot()
    profiles = {Path(r).name: {k: block_profile(read_scalars(r), k) for k in ("var", "grad_norm")}
                for r in runs}
    lines = [f"# {Path(out).name}", "", f"Command: `{command}`", "",
             "Mean of the last 5 logged steps of each run.", ""]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, label in zip(axes, ("var", "grad_norm"),
                               ("residual-stream variance", "gradient norm of the block")):
        lines += [f"| {label} | " + " | ".join(f"block {i}" for i in
                                              range(len(next(iter(profiles.values()))[kind])))
                  + " |", "|---" * (1 + len(next(iter(profiles.values()))[kind])) + "|"]
        for name, prof in profiles.items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in prof[kind]) + " |")
            ax.plot(range(len(prof[kind])), prof[kind], marker="o", label=name)
        lines.append("")
        ax.set(xlabel="block", ylabel=label, yscale="log", title=label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(f"{out}.png", dpi=110)
    plt.close(fig)
    Path(f"{out}.md").write_text("\n".join(lines) + f"\n![blocks]({Path(out).name}.png)\n")
    print("\n".join(lines))
