"""gpu-check's correctness rows: PGT's gradient under autocast against the float64 closed form
(check.py's cases on this device), ResNet-50 steps through the engine, and DDP's averaged
gradient against one process's whole-batch gradient."""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from powergrad.commands.gpu_context import (NO_CUDA, Context, Row, data_overrides, free_port,
                                            paper_recipe)


def pgt_row(ctx: Context, dtype: torch.dtype) -> Row:
    from powergrad.commands.check import FP16_SCALES, LIMITS, TARGET_KINDS, autocast_case

    fp16 = dtype is torch.float16
    name = "pgt fp16 + GradScaler" if fp16 else "pgt bf16"
    gen = torch.Generator().manual_seed(0)
    cases = list(itertools.product(TARGET_KINDS, [8, 256], FP16_SCALES if fp16 else [1.0],
                                   [0.0, 0.25, 1.0]))
    errors = [autocast_case(kind, n, scale, alpha, dtype, ctx.device, gen)
              for kind, n, scale, alpha in cases]
    worst, limit = max(errors), LIMITS[dtype]
    return Row(name, f"{ctx.device.type} autocast, {len(cases)} cases",
               "pass" if worst < limit else "FAIL",
               f"worst relative error {worst:.1e} (limit {limit:.0e}) vs float64 closed form")


def engine_row(ctx: Context, root: Path) -> Row:
    """A few optimizer steps of the paper recipe through the engine, nothing written."""
    from powergrad.training.engine import train

    b = ctx.sizes.batch
    # zero_init_last: after 2-3 steps BatchNorm's running statistics are still near their
    # initial values, and with the recipe's init (the paper's) a ResNet-50's activations then
    # overflow in evaluation; zero-initialised residual branches keep it finite.
    recipe = paper_recipe(ctx, [*data_overrides(ctx, root, "torchvision"),
                                "model.num_classes=10", "model.kwargs.zero_init_last=true",
                                f"train.batch_size={b}",
                                f"train.global_batch={2 * b}", f"train.eval_batch_size={b}",
                                f"log.output={ctx.workdir / 'runs'}"])
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    output = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        summary = train(recipe, max_steps=ctx.sizes.engine_steps)
    seconds = time.perf_counter() - start
    ok = (summary["updates"] == ctx.sizes.engine_steps
          and math.isfinite(summary["final_train_loss"]))
    memory = (f", peak memory {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.1f} GiB"
              if ctx.cuda else "")
    return Row("engine resnet50", f"{ctx.device.type}, {recipe.train.amp_dtype} autocast, "
               f"channels_last, {b} x 2 accumulation, {ctx.sizes.res} px",
               "pass" if ok else "FAIL",
               f"{summary['updates']} steps, train loss {summary['final_train_loss']:.3f}, "
               f"{seconds:.1f} s with set-up{memory}")


def _small_net() -> nn.Module:
    # No BatchNorm: per-shard statistics would make the shards' gradients differ from the
    # full batch's, which is the point of comparison.
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(256, 10))


def ddp_worker(rank: int, world: int, backend: str, port: int, steps: int, out: str) -> None:
    """One process of the DDP row: shard r of a fixed batch through DDP, rank 0 compares the
    averaged gradient with the whole batch's gradient on one process, then times steps."""
    import torch.distributed as dist

    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32, to compare gradients
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        reference = _small_net().to(device)
        model = nn.parallel.DistributedDataParallel(
            _small_net().to(device), device_ids=[rank] if cuda else None)
        model.module.load_state_dict(reference.state_dict())
        gen = torch.Generator().manual_seed(1)
        images = torch.randn(8 * world, 3, 16, 16, generator=gen).to(device)
        labels = torch.randint(0, 10, (8 * world,), generator=gen).to(device)
        loss_fn = nn.CrossEntropyLoss()
        shard = slice(8 * rank, 8 * (rank + 1))
        loss_fn(model(images[shard]), labels[shard]).backward()
        loss_fn(reference(images), labels).backward()
        got = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
        want = torch.cat([p.grad.flatten() for p in reference.parameters()]).double()
        error = ((got - want).norm() / want.norm()).item()
        errors = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(errors, torch.tensor([error], dtype=torch.float64, device=device))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images[shard]), labels[shard]).backward()
            optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        if rank == 0:
            Path(out).write_text(json.dumps({
                "max_error": max(e.item() for e in errors),
                "ms_per_step": 1000 * (time.perf_counter() - start) / steps}))
    finally:
        dist.destroy_process_group()


def ddp_row(ctx: Context) -> Row:
    """DDP's averaged gradient against one process's whole-batch gradient. NCCL over every
    GPU; where fewer than 2 GPUs are visible, also 2 gloo processes on the CPU, since one
    process would only compare its gradient with itself (its NCCL run is then a smoke test)."""
    import torch.multiprocessing as mp

    gpus = torch.cuda.device_count() if ctx.cuda else 0
    groups = ([("nccl", gpus)] if gpus else []) + ([("gloo", 2)] if gpus < 2 else [])
    results, paths = [], []
    for backend, world in groups:
        out = ctx.workdir / f"ddp_{backend}.json"
        out.unlink(missing_ok=True)
        mp.spawn(ddp_worker, args=(world, backend, free_port(), ctx.sizes.ddp_steps, str(out)),
                 nprocs=world, join=True)
        results.append((world, json.loads(out.read_text())))
        paths.append(f"{backend}, {world} process{'es' if world > 1 else ''}"
                     + (" (a smoke test)" if world == 1 else ""))
    if not ctx.cuda:
        paths[-1] += f" (nccl: {NO_CUDA})"
    error = max(r["max_error"] for world, r in results if world > 1)
    limit = 1e-5
    return Row("ddp", "; ".join(paths), "pass" if error < limit else "FAIL",
               f"averaged gradient vs one process's full batch: relative error {error:.1e} "
               f"(limit {limit:.0e}); {results[0][1]['ms_per_step']:.1f} ms per step of a "
               "small net")
