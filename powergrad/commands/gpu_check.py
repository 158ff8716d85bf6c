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
  ddp                   DistributedDataParallel over every visible GPU (NCCL; 1 GPU: a
                        1-process group): the averaged gradient against one process's
                        full-batch gradient, and the time per step.
  gpu-hours             time per optimizer step of the ResNet-50 paper recipe at its own batch
                        (one GPU: micro-batches with accumulation), times its steps per epoch and
                        epochs on ImageNet-1k, as GPU-hours (training only, loader assumed fast
                        enough; divided by a loader's feed ratio where measured).

Without CUDA the same rows run in a reduced form on the CPU (tiny images, few steps, gloo
instead of NCCL, DALI's CPU decode): tests/test_gpu_check.py runs it, so the code stays alive.
Parts that only a GPU can run print "skipped: no CUDA device".
"""
from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

PAPER_RECIPE = Path(__file__).resolve().parents[2] / "recipes/imagenet/resnet50_cosine_pgt.yaml"
NO_CUDA = "skipped: no CUDA device"
LOADERS = ("ffcv", "dali", "torchvision")


@dataclass(frozen=True)
class Sizes:
    """How much each row does: the full form on a GPU, the reduced form on the CPU."""
    images: int  # synthetic JPEGs written for the loader and engine rows
    image_px: tuple[int, int]  # their side lengths range
    res: int  # training resolution
    batch: int  # images per loader batch and per engine micro-batch
    warmup: int  # batches before timing starts
    engine_steps: int
    ddp_steps: int
    step_batch: int | None  # gpu-hours: the recipe's micro-batch when None
    step_repeats: int
    workers: int


FULL = Sizes(images=2048, image_px=(300, 500), res=224, batch=64, warmup=4, engine_steps=3,
             ddp_steps=10, step_batch=None, step_repeats=5, workers=min(8, os.cpu_count() or 1))
REDUCED = Sizes(images=20, image_px=(40, 90), res=32, batch=4, warmup=1, engine_steps=2,
                ddp_steps=2, step_batch=2, step_repeats=2, workers=1)


@dataclass
class Row:
    name: str
    path: str  # what ran, on which device
    status: str = "pass"  # pass | FAIL | skipped: ...
    numbers: str = ""
    seconds: float = 0.0  # the row's wall time, set-up included

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    workdir: Path
    recipe: Path = PAPER_RECIPE  # the ResNet-50 paper recipe the engine rows train
    feed_ratios: dict = field(default_factory=dict)  # loader name -> measured feed ratio

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype:
        # fp16 runs some 20x slower than bf16 on a CPU: the reduced form uses bf16 there
        return torch.float16 if self.cuda else torch.bfloat16

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# --- PGT exactness ---------------------------------------------------------------------------

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


# --- data ------------------------------------------------------------------------------------

def synthetic_data(ctx: Context) -> Path:
    """A JPEG ImageFolder tree of 10 classes (train and val) and .beton files of it as the
    writer writes them by default; reused when `workdir` already holds them."""
    from powergrad.data.ffcv_writer import write_imagefolder_beton
    from powergrad.data.synthetic_images import write_synthetic_image_folder

    root = ctx.workdir / f"data_{ctx.sizes.images}"
    if (root / ".complete").exists():
        return root
    print(f"gpu-check: writing synthetic JPEGs and .beton files to {root}", file=sys.stderr,
          flush=True)
    classes = [f"n{i:08d}" for i in range(10)]
    px = ctx.sizes.image_px
    for split, per_class, seed in (("train", ctx.sizes.images // 10, 0),
                                   ("val", max(1, ctx.sizes.images // 40), 1)):
        write_synthetic_image_folder(root / split, classes, per_class, width_range=px,
                                     height_range=px, seed=seed)
        if _skip_reason("ffcv") is None:
            with contextlib.redirect_stderr(io.StringIO()):  # the writer's progress bar
                write_imagefolder_beton(root / split, root / f"{split}.beton",
                                        workers=ctx.sizes.workers, overwrite=True)
    (root / ".complete").touch()
    return root


# The loaders' modules and the distributions that install them.
LOADER_MODULES = {"ffcv": ("ffcv.loader", "ffcv"),
                  "dali": ("nvidia.dali.plugin.pytorch", "nvidia-dali"),
                  "torchvision": ("torchvision", "torchvision")}


def _skip_reason(loader: str) -> str | None:
    """None when the loader imports, else the row's "skipped: ..." status."""
    module, distribution = LOADER_MODULES[loader]
    try:
        __import__(module)
    except ModuleNotFoundError:
        return f"skipped: {distribution} not installed"
    except Exception as e:  # installed, but a broken native build
        return f"skipped: {distribution} does not import ({type(e).__name__}: {e})"
    return None


def data_overrides(ctx: Context, root: Path, loader: str) -> list[str]:
    return [f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}",
            f"data.train_beton={root / 'train.beton'}", f"data.val_beton={root / 'val.beton'}",
            f"data.loader={loader}", f"data.workers={ctx.sizes.workers}",
            f"data.img_size={ctx.sizes.res}", f"data.val_img_size={ctx.sizes.res}",
            "data.min_res=null", "data.max_res=null", "data.num_classes=10"]


def device_overrides(ctx: Context) -> list[str]:
    dtype = "float16" if ctx.amp_dtype is torch.float16 else "bfloat16"
    threads = [] if ctx.cuda else ["train.threads=1"]
    return [f"train.device={ctx.device.type}", f"train.amp_dtype={dtype}", *threads]


# --- training steps from the paper recipe ----------------------------------------------------

class RecipeSteps:
    """Forward, loss, backward and optimizer step of a recipe's model, with its AMP and
    channels_last, `accum` micro-batches per optimizer step: the work of one training step
    without the engine's logging, for timing against different data sources."""

    def __init__(self, recipe, device: torch.device, amp_dtype: torch.dtype,
                 sync: Callable[[], None], accum: int = 1):
        from powergrad.training.builders import build_optimizer, build_train_loss
        from powergrad.training.models import build_model

        self.device, self.amp_dtype, self.sync, self.accum = device, amp_dtype, sync, accum
        self.model = build_model(recipe.model).to(device, memory_format=torch.channels_last)
        self.optimizer = build_optimizer(recipe, self.model)
        self.mixup, self.loss_fn = build_train_loss(recipe)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One whole optimizer step on one batch."""
        self.micro_step(images, labels, last=True)

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, last: bool) -> None:
        if self.mixup is not None:  # as the engine does: the loss then takes soft targets
            images, labels = self.mixup(images, labels)
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            loss = self.loss_fn(self.model(images), labels) / self.accum
        self.scaler.scale(loss).backward()
        if last:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)

    def images_per_second(self, batches, warmup: int) -> tuple[float, int]:
        """Train on every batch of `batches`; time all but the first `warmup`."""
        start, count = None, 0
        for i, (images, labels) in enumerate(batches):
            if i == warmup:
                self.sync()
                start = time.perf_counter()
            self.micro_step(images, labels, last=(i + 1) % self.accum == 0)
            count += images.shape[0] if i >= warmup else 0
        self.sync()
        if start is None or count == 0:
            raise RuntimeError(f"only {i + 1 if count else 0} batches: nothing timed")
        return count / (time.perf_counter() - start), count


def paper_recipe(ctx: Context, overrides: list[str]):
    from powergrad.config.loading import load_recipe

    return load_recipe(ctx.recipe, [*device_overrides(ctx), *overrides])


# --- rows ------------------------------------------------------------------------------------

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
        summary = train(recipe, fast_dev_run=ctx.sizes.engine_steps)
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


def _loader_path(ctx: Context, name: str) -> str:
    if name == "ffcv":
        return "ToDevice to cuda" if ctx.cuda else f"CPU batches (ToDevice: {NO_CUDA})"
    if name == "dali":
        return "mixed decode on cuda" if ctx.cuda else f"CPU decode (mixed: {NO_CUDA})"
    return "pinned memory to cuda" if ctx.cuda else f"CPU batches (pinned memory: {NO_CUDA})"


def loader_row(ctx: Context, root: Path, name: str, steps: RecipeSteps) -> Row:
    from powergrad.config.schema import DataConfig
    from powergrad.data.images import build_image_loaders

    skipped = _skip_reason(name)
    if skipped is not None:
        return Row(f"loader {name}", _loader_path(ctx, name), skipped)
    s = ctx.sizes
    cfg = DataConfig(dataset="imagefolder", loader=name, train_dir=str(root / "train"),
                     val_dir=str(root / "val"), train_beton=str(root / "train.beton"),
                     val_beton=str(root / "val.beton"), workers=s.workers, img_size=s.res,
                     num_classes=10)
    train, _ = build_image_loaders(cfg, batch_size=s.batch, eval_batch_size=s.batch, seed=0,
                                   device=ctx.device, channels_last=True)
    train.set_epoch(0)  # first pass: start-up (ffcv compiles, DALI builds) and training
    fed, count = steps.images_per_second(train, s.warmup)
    train.set_epoch(1)  # second pass: the loader alone
    batches = iter(train)
    next(batches)
    ctx.sync()
    start, alone = time.perf_counter(), 0
    for images, _ in batches:
        alone += images.shape[0]
    ctx.sync()
    alone_rate = alone / (time.perf_counter() - start)
    images, labels = next(iter(train))
    cached = itertools.repeat((images.clone(), labels.clone()), s.warmup + len(train))
    cached_rate, _ = steps.images_per_second(cached, s.warmup)
    ratio = fed / cached_rate
    ctx.feed_ratios[name] = ratio
    return Row(f"loader {name}", _loader_path(ctx, name), "pass",
               f"alone {alone_rate:.0f} img/s; ResNet-50 from it {fed:.0f} img/s, from a cached "
               f"batch {cached_rate:.0f} img/s: feed ratio {ratio:.2f} ({count} images timed)")


def gpu_hours_row(ctx: Context) -> Row:
    """Time per optimizer step of the paper recipe on one device at its own batch plan."""
    from powergrad.config.batching import plan_batch
    from powergrad.data.imagenet_archives import IMAGENET
    from powergrad.training.builders import build_scheduler

    recipe = paper_recipe(ctx, [])
    if ctx.sizes.step_batch is None:
        plan = plan_batch(recipe.train.global_batch, recipe.train.batch_size,
                          recipe.train.grad_accum_steps, 1)
        micro, accum, res = plan.micro_batch, plan.accum_steps, recipe.data.img_size
    else:
        micro, accum, res = ctx.sizes.step_batch, 2, ctx.sizes.res
    steps = RecipeSteps(recipe, ctx.device, ctx.amp_dtype, ctx.sync, accum)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(micro, 3, res, res, generator=gen).to(
        ctx.device, memory_format=torch.channels_last)
    labels = torch.randint(0, recipe.model.num_classes, (micro,), generator=gen).to(ctx.device)
    warmup = accum * 2
    timed = accum * ctx.sizes.step_repeats
    rate, _ = steps.images_per_second(itertools.repeat((images, labels), warmup + timed), warmup)
    seconds_per_step = micro * accum / rate
    path = f"{micro} x {accum} accumulation, {res} px, {ctx.device.type}"
    if not ctx.cuda:
        return Row("gpu-hours", path, NO_CUDA,
                   f"(the step code ran: {seconds_per_step:.2f} s per step at this tiny size)")
    global_batch = micro * accum
    steps_per_epoch = IMAGENET.train_images // global_batch
    _, epochs = build_scheduler(recipe, steps.optimizer, steps_per_epoch)  # cool-down too
    hours = seconds_per_step * steps_per_epoch * epochs / 3600
    loaders = "; ".join(f"fed by {name} (ratio {r:.2f}): {hours / r:.0f}"
                        for name, r in ctx.feed_ratios.items() if r > 0)
    return Row("gpu-hours", path, "pass",
               f"{seconds_per_step:.3f} s per step of {global_batch} x {steps_per_epoch} steps "
               f"x {epochs} epochs = {hours:.0f} GPU-hours, compute alone"
               + (f"; {loaders}" if loaders else ""))


# --- DDP -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    import torch.multiprocessing as mp

    world = torch.cuda.device_count() if ctx.cuda else 1
    backend = "nccl" if ctx.cuda else "gloo"
    out = ctx.workdir / "ddp.json"
    out.unlink(missing_ok=True)
    mp.spawn(ddp_worker, args=(world, backend, _free_port(), ctx.sizes.ddp_steps, str(out)),
             nprocs=world, join=True)
    result = json.loads(out.read_text())
    limit = 1e-5
    path = (f"nccl, {world} process(es)" if ctx.cuda
            else f"gloo, 1 process (nccl: {NO_CUDA})")
    return Row("ddp", path, "pass" if result["max_error"] < limit else "FAIL",
               f"averaged gradient vs one process's full batch: relative error "
               f"{result['max_error']:.1e} (limit {limit:.0e}); "
               f"{result['ms_per_step']:.1f} ms per step of a small net")


# --- the command -----------------------------------------------------------------------------

def run(workdir: Path, device: torch.device | None = None,
        recipe: Path = PAPER_RECIPE) -> list[Row]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
