"""Cost of the PowerGrad Transform, measured side by side with ordinary cross-entropy.

(a) the loss alone: forward + backward on logits [N, C] for each --sizes, eager and with
    torch.compile (both sides compiled), timed by torch.utils.benchmark.Timer;
(b) a whole training step (forward, backward, SGD step) of timm's resnet50 on the CPU.
Baseline and PGT runs are interleaved round by round (who goes first alternates), and the
median and range of the per-round ratios are reported, so slow drifts of this shared machine
hit both sides alike and the noise shows. Writes a JSON record and renders the markdown table
from it (tools/bench_record.py); --render redraws a table from a record without measuring.

    python tools/bench_pgt.py --write results/bench_pgt.md      # and results/bench_pgt.json
    python tools/bench_pgt.py --render results/bench_pgt.json --write results/bench_pgt.md
"""
from __future__ import annotations

import argparse

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_record import add_output_arguments, new_record, run
from bench_timing import Spread, calls_for, op_seconds, seconds, side_by_side

from powergrad import PowerGradCrossEntropy

TOOL, TOOL_PATH = "bench_pgt", "tools/bench_pgt.py"
SIDES = ("cross_entropy", "pgt")
TARGETS = {"loss_op": 1.3, "train_step": 1.01}  # PGT/CE, median over rounds


def loss_op_case(alpha: float, n: int, c: int, compiled: bool):
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(n, c, generator=gen) * 3).requires_grad_()
    y = torch.randint(0, c, (n,), generator=gen)
    ce, pgt = F.cross_entropy, PowerGradCrossEntropy(alpha)
    if compiled:
        ce, pgt = torch.compile(ce), torch.compile(pgt)

    def make(loss_fn):
        def run_once():
            z.grad = None
            loss_fn(z, y).backward()
        return run_once

    return {"cross_entropy": make(ce), "pgt": make(pgt)}


def train_step_case(alpha: float, res: int, batch: int):
    """One model and optimizer shared by both sides, so only the loss differs."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, res, res)
    y = torch.randint(0, 1000, (batch,))
    model = timm.create_model("resnet50", num_classes=1000)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)  # tiny lr: stays stable

    def make_step(loss_fn):
        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        return step

    return {"cross_entropy": make_step(nn.CrossEntropyLoss()),
            "pgt": make_step(PowerGradCrossEntropy(alpha))}


def timed_sides(fns: dict, rounds: int, threads: int, op_level: bool,
                target_s: float = 0.05) -> dict[str, list[float]]:
    """Seconds per call of each side, one per round; each measurement about `target_s` for the
    slower side. Op-level cases go through torch.utils.benchmark.Timer."""
    for fn in fns.values():  # warm-up: compilation, allocator, thread pools, dispatch
        seconds(fn, 3)
    calls = calls_for(list(fns.values()), target_s)
    if op_level:
        cases = {side: op_seconds(fn, calls, threads) for side, fn in fns.items()}
    else:
        cases = {side: (lambda fn=fn: seconds(fn, calls)) for side, fn in fns.items()}
    return side_by_side(cases, rounds)


def case_row(case: dict, times: dict[str, list[float]]) -> dict:
    ms = {side: [t * 1e3 for t in times[side]] for side in SIDES}
    return {**case, "target": TARGETS[case["kind"]],
            **{f"{side}_ms": Spread.of(ms[side]).to_json() for side in SIDES},
            "ratio": Spread.of_ratios(ms["pgt"], ms["cross_entropy"]).to_json()}


def label(row: dict) -> str:
    if row["kind"] == "loss_op":
        how = "torch.compile" if row["compiled"] else "eager"
        return f"loss op [{row['n']}, {row['c']}], {how}"
    return f"resnet50 train step, batch {row['batch']} at {row['res']}px"


def measure(args, command: str) -> dict:
    torch.set_num_threads(args.threads)
    record = new_record(TOOL, command, {
        "alpha": args.alpha, "rounds": args.rounds, "op_clock": "torch.utils.benchmark.Timer",
        "sizes": [list(s) for s in args.sizes], "compile": not args.no_compile,
        "res": args.res, "batch": args.batch}, threads=args.threads)
    cases = [{"kind": "loss_op", "n": n, "c": c, "compiled": compiled}
             for n, c in args.sizes for compiled in ([False] if args.no_compile else [False, True])]
    if args.batch:
        cases.append({"kind": "train_step", "batch": args.batch, "res": args.res})
    for case in cases:
        if case["kind"] == "loss_op":
            fns = loss_op_case(args.alpha, case["n"], case["c"], case["compiled"])
        else:
            fns = train_step_case(args.alpha, case["res"], case["batch"])
        times = timed_sides(fns, args.rounds, args.threads, op_level=case["kind"] == "loss_op")
        record["samples"][label(case)] = {f"{side}_s": times[side] for side in SIDES}
        record["rows"].setdefault("cases", []).append(case_row(case, times))
        print(label(case), Spread(**record["rows"]["cases"][-1]["ratio"]).text(), flush=True)
    return record


def implied_step_ratio(rows: list[dict]) -> str | None:
    """The loss is the only difference inside a step, so its measured extra cost bounds the
    step ratio far more tightly than timing whole steps on a noisy machine can."""
    op = next((r for r in rows if r["kind"] == "loss_op" and r["c"] == 1000
               and not r["compiled"]), None)
    step = next((r for r in rows if r["kind"] == "train_step"), None)
    if op is None or step is None:
        return None
    op_ce, op_pgt = op["cross_entropy_ms"]["median"], op["pgt_ms"]["median"]
    step_ce = step["cross_entropy_ms"]["median"]
    implied = 1 + (op_pgt - op_ce) * (step["batch"] / op["n"]) / step_ce  # op cost ~ batch
    return (f"Implied whole-step ratio from the eager loss-op difference alone: {implied:.4f} "
            f"(the loss op costs {op_pgt:.2f} ms at batch {op['n']} against a {step_ce:.0f} ms "
            f"step at batch {step['batch']}).")


def render(record: dict) -> str:
    m, p, rows = record["machine"], record["params"], record["rows"]["cases"]
    lines = [
        "# PGT cost against ordinary cross-entropy", "",
        f"Command: `{record['command']}`  ",
        f"Machine: {m['arch']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"load average {m['load_average'][0]:.2f} at the start; torch {m['torch']}, "
        f"timm {m['timm']}; alpha = {p['alpha']}; {p['rounds']} interleaved rounds"
        + (f"; measured {record['date']}." if record.get("date") else "."), "",
        "| case | cross-entropy ms | PGT ms | median ratio PGT/CE | ratio range | target |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = Spread(**row["ratio"])
        verdict = "met" if ratio.median <= row["target"] else "NOT met"
        lines.append(f"| {label(row)} | {row['cross_entropy_ms']['median']:.3f} "
                     f"| {row['pgt_ms']['median']:.3f} | {ratio.median:.2f} "
                     f"| {ratio.low:.2f} - {ratio.high:.2f} | <= {row['target']} ({verdict}) |")
    lines += [
        "", "Times are medians over rounds; the ratio is the median of per-round ratios, each "
        "round timing both sides back to back (the order alternates between rounds); the range "
        "is the smallest and largest per-round ratio. Compiled rows compile both sides. "
        f"Loss-op rows are timed with {p['op_clock']}.",
    ]
    implied = implied_step_ratio(rows)
    return "\n".join(lines + (["", implied] if implied else [])) + "\n"


def size(text: str) -> tuple[int, int]:
    n, c = text.lower().split("x")
    return int(n), int(c)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds per case")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--sizes", type=size, nargs="+", default=[(1024, 1000), (256, 10)],
                        metavar="NxC", help="logit shapes for the loss-op cases")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--res", type=int, default=64, help="train-step image size")
    parser.add_argument("--batch", type=int, default=16, help="train-step batch (0: skip the step)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, argv, TOOL, TOOL_PATH, measure, render)


if __name__ == "__main__":
    main()
