"""`powergrad gpu-check`: run every GPU code path of the suite for a few steps and print a
pass/fail table with its numbers. The first command to run on a new GPU machine.

Rows (README, "On a GPU machine", says what to do when one fails):
  pgt fp16 / pgt bf16   PGT's logit gradient under autocast (fp16 with a GradScaler, bf16)
                        against the float64 closed form: check.py's cases on this device.
  engine                optimizer steps of the ResNet-50 paper recipe through engine.train
                        (fast_dev_run): channels_last, the recipe's AMP (fp16 + GradScaler),
                        gradient accumulation, evaluation, on a synthetic JPEG folder.
  loader ffcv|dali|torchvision
                        each loader feeding the device (ffcv's ToDevice, DALI's mixed decode,
                        torchvision's pinned memory): images/s alone, images/s of ResNet-50
                        training from it, and the feed ratio = that rate over training from one
                        batch kept on the device (1.0: the GPU never waits for data).
  ddp                   DistributedDataParallel over every visible GPU (NCCL), and with fewer
                        than 2 GPUs also 2 gloo processes on the CPU: the averaged gradient
                        against one process's full-batch gradient, and the time per step.
  engine ddp resnet50   `powergrad torchrun --nproc_per_node <GPUs>` (a subprocess) training the
                        paper recipe for 2 short epochs: fp16 + GradScaler, channels_last,
                        accumulation (DDP's no_sync), SyncBN, checkpoints; stopped by SIGUSR1
                        after its first step (exit 75), resumed by the same command: its weights
                        against an uninterrupted twin's, bit for bit, and its evaluation against
                        one process's over the validation images written (each counted once).
  engine ddp torchcompile
                        the twin's first epoch again with train.torchcompile and SyncBN under
                        DDP (--fast-dev-run): its train loss against the eager twin's.
                        Neither engine ddp row has run on a GPU yet (gpu_engine.py).
  gpu-hours             time per optimizer step of the ResNet-50 paper recipe at its own batch
                        (one GPU: micro-batches with accumulation), times its steps per epoch and
                        epochs on ImageNet-1k, as GPU-hours (training only, loader assumed fast
                        enough; divided by a loader's feed ratio where measured).

Without CUDA the same rows run in a reduced form on the CPU (tiny images, few steps, gloo
instead of NCCL, DALI's CPU decode, fp16 made bf16 without a GradScaler, a ResNet-50 of one
block per stage in the engine ddp rows): tests/test_gpu_check.py and tests/test_cluster.py run
it, so the code stays alive.
Parts that only a GPU can run print "skipped: no CUDA device".
"""
from __future__ import annotations

import contextlib
import functools
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from powergrad.commands.gpu_context import (FULL, LOADERS, PAPER_RECIPE, REDUCED, Context, Row,
                                            paper_recipe, synthetic_data)
from powergrad.commands.gpu_correctness import ddp_row, engine_row, pgt_row
from powergrad.commands.gpu_engine import compile_row, ddp_engine_row
from powergrad.commands.gpu_throughput import RecipeSteps, gpu_hours_row, loader_row
from powergrad.system.gpus import refuse_unusable_gpu


def run(workdir: Path, device: torch.device | None = None,
        recipe: Path = PAPER_RECIPE) -> list[Row]:
    device = refuse_unusable_gpu(device or torch.device("cuda" if torch.cuda.is_available()
                                                        else "cpu"))
    ctx = Context(device, FULL if device.type == "cuda" else REDUCED, workdir, recipe)
    rows: list[Row] = []

    def attempt(name: str, make_row) -> None:
        start = time.perf_counter()
        try:
            row = make_row()
        except Exception as e:  # one broken path must not hide the others' results
            message = str(e).strip().splitlines()
            row = Row(name, device.type, "FAIL",
                      f"{type(e).__name__}: {message[0] if message else ''}")
        row.seconds = time.perf_counter() - start
        rows.append(row)

    attempt("pgt fp16 + GradScaler", lambda: pgt_row(ctx, torch.float16))
    attempt("pgt bf16", lambda: pgt_row(ctx, torch.bfloat16))
    data = functools.cache(lambda: synthetic_data(ctx))  # a failure shows in each row
    attempt("engine resnet50", lambda: engine_row(ctx, data()))
    steps = None
    for name in LOADERS:
        def loader(name=name):
            nonlocal steps
            if steps is None:  # one model for every loader: same work per step
                steps = RecipeSteps(paper_recipe(ctx, []), ctx.device, ctx.amp_dtype, ctx.sync)
            return loader_row(ctx, data(), name, steps)
        attempt(f"loader {name}", loader)
    steps = None  # free the model before the next rows
    attempt("ddp", lambda: ddp_row(ctx))
    if ctx.cuda:  # the launches below need the GPUs' memory this process cached
        torch.cuda.empty_cache()
    attempt("engine ddp resnet50", lambda: ddp_engine_row(ctx, data()))
    attempt("engine ddp torchcompile", lambda: compile_row(ctx, data()))
    attempt("gpu-hours", lambda: gpu_hours_row(ctx))
    return rows


def format_table(rows: list[Row], device: torch.device) -> str:
    if device.type == "cuda":
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        title = f"powergrad gpu-check on {names} (torch {torch.__version__})"
    else:
        title = (f"powergrad gpu-check, reduced form on the CPU (no CUDA device; torch "
                 f"{torch.__version__})")
    lines = [title, "", "| check | path | result | numbers | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.path} | {r.status} | {r.numbers} | {r.seconds:.1f} |"
              for r in rows]
    failed = [r.name for r in rows if r.failed]
    lines += ["", f"FAILED: {', '.join(failed)}" if failed else "all checks passed"]
    return "\n".join(lines)


def write_results(out: Path, table: str, rows: list[Row], device: torch.device) -> None:
    """OUT/gpu_check.md (the printed table) and OUT/gpu_check.json (the same rows)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(table + "\n")
    record = {"title": table.splitlines()[0], "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "host": socket.gethostname(), "torch": torch.__version__,
              "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                         else "cpu"),
              "rows": [{"check": r.name, "path": r.path, "result": r.status,
                        "numbers": r.numbers, "seconds": round(r.seconds, 2)} for r in rows]}
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")


def main(workdir: str | None = None, out: str | None = None, recipe: str | None = None) -> int:
    """Run the checks, print the table (and write it to OUT); exit 1 when any row failed,
    2 when the recipe is missing."""
    recipe_path = Path(recipe) if recipe else PAPER_RECIPE
    if not recipe_path.is_file():
        print(f"gpu-check: {recipe_path}: recipe not found; run from a checkout of the "
              "repository (PYTHONPATH=.) or pass --recipe recipes/imagenet/"
              f"{PAPER_RECIPE.name}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_"))
        Path(workdir).mkdir(parents=True, exist_ok=True)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = run(Path(workdir), device, recipe_path)
    table = format_table(rows, device)
    print(table, flush=True)
    if out is not None:
        write_results(Path(out), table, rows, device)
    return 1 if any(r.failed for r in rows) else 0
