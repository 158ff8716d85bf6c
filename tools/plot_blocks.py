"""Plot the GPAS diagnostics of ViT runs against depth: per-block residual-stream variance and
gradient norm, as a markdown table (PATH.md) and a PNG (PATH.png).

    python tools/plot_blocks.py runs/vit_study/vit_pre runs/vit_study/vit_pre_gpas \\
        --out runs/vit_study/blocks

Each value is the mean of the last 5 logged steps. A run without the per-block record (not a
ViT, log.diagnostics off, or fewer steps than log.log_interval) is refused with exit 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from powergrad.report.compare import MISSING
from powergrad.report.events import TAIL_POINTS, read_scalars, tail_mean
from powergrad.report.plotting import pyplot


def block_profile(series: dict, kind: str) -> list[float]:
    """Per-block values of a ViT run's probe (kind 'var' or 'grad_norm'), each the mean of the
    last logged points (report.events.tail_mean): index i holds block i."""
    tags = sorted(t for t in series if t.startswith(f"gpas/{kind}/block"))
    return [tail_mean(series[t]) for t in tags]


def block_report(runs: list[str], out: str, command: str) -> int:
    """Markdown and PNG of residual-stream variance and gradient norm against depth. Refuses
    (exit 1, nothing written) when a run has no per-block record."""
    profiles, problems = {}, []
    for run in runs:
        try:
            series = read_scalars(run)
        except FileNotFoundError as err:
            problems.append(str(err))
            continue
        prof = {k: block_profile(series, k) for k in ("var", "grad_norm")}
        if not prof["var"]:
            problems.append(f"{run}: no per-block scalars (gpas/var/block*); they need a ViT "
                            "run with log.diagnostics: true and at least log.log_interval "
                            "optimizer steps")
        profiles[Path(run).name] = prof
    if problems:
        print("plot_blocks: nothing written:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    plt = pyplot()
    depth = max(len(p["var"]) for p in profiles.values())
    lines = [f"# {Path(out).name}", "", f"Command: `{command}`", "",
             f"Mean of the last {TAIL_POINTS} logged steps of each run.", ""]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, label in zip(axes, ("var", "grad_norm"),
                               ("residual-stream variance", "gradient norm of the block")):
        lines += [f"| {label} | " + " | ".join(f"block {i}" for i in range(depth)) + " |",
                  "|---" * (1 + depth) + "|"]
        for name, prof in profiles.items():
            values = [f"{v:.4g}" for v in prof[kind]] + [MISSING] * (depth - len(prof[kind]))
            lines.append(f"| {name} | " + " | ".join(values) + " |")
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
    print(f"wrote {out}.md and {out}.png")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="ViT run folders")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="write PATH.md and PATH.png (e.g. runs/vit_study/blocks)")
    args = parser.parse_intermixed_args()
    sys.exit(block_report(args.runs, args.out, command="python " + " ".join(sys.argv)))
