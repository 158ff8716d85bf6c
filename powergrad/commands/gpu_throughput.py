"""gpu-check's throughput rows: each loader feeding the device (images/s alone, ResNet-50
training from it, the feed ratio) and the paper recipe's GPU-hours; the timed step is the
engine's own (training.step.train_step on build_training's parts), shared with
tools/gpu_saturation.py."""
from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from powergrad.commands.gpu_context import NO_CUDA, Context, Row, paper_recipe, skip_reason
from powergrad.config.batching import plan_batch
from powergrad.data.contract import TrainLoader
from powergrad.training.setup import Training, build_training
from powergrad.training.step import TrainState, train_step


class RecipeSteps:
    """The engine's own train_step on a recipe's parts (build_training, no data), channels_last
    and the given autocast, `accum` micro-batches per optimizer step: the work of a training
    step without the engine's logging, timed against different sources of batches."""

    def __init__(self, recipe, device: torch.device, amp_dtype: torch.dtype,
                 sync: Callable[[], None], accum: int = 1, training: Training | None = None):
        self.training = training or build_training(recipe, with_data=False, device=device)
        self.training.model.to(memory_format=torch.channels_last)
        self.training.amp_dtype = amp_dtype  # the check is about AMP, whatever the recipe says
        self.training.plan = plan_batch(None, recipe.train.batch_size, accum, 1)
        self.sync, self.accum, self.state = sync, accum, TrainState()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        """One optimizer step on one batch (accum 1: tools/gpu_saturation.py's step)."""
        return self.step([(images, labels)])

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """One optimizer step over `accum` batches (images, labels); the images it trained."""
        train_step(self.training, ((images, labels, 0.0) for images, labels in batches), None,
                   self.state)
        return sum(images.shape[0] for images, _ in batches)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def endless(loader: TrainLoader, first_epoch: int = 0) -> Iterator:
    """The loader's batches, epoch after epoch (each epoch's order from seed + epoch)."""
    for epoch in itertools.count(first_epoch):
        loader.set_epoch(epoch)
        yield from loader


def images_per_second(step: Callable, batches: Iterator, steps: int, warmup: int,
                      sync: Callable[[], None]) -> float:
    """Train `warmup` steps untimed, then `steps` timed steps on the next batches; `step`
    returns the images it trained."""
    for _ in range(warmup):
        step(*next(batches))
    sync()
    start, count = time.perf_counter(), 0
    for _ in range(steps):
        count += step(*next(batches))  # a step returns the images it trained
    sync()
    return count / (time.perf_counter() - start)


def feed_ratio(step: Callable, loader_batches: Iterator, steps: int, warmup: int,
               sync: Callable[[], None], rounds: int = 2) -> dict:
    """Rates from the loader and from one of its batches kept on the device, alternating,
    `rounds` times; ratio = median of per-round loader rate / resident rate."""
    images, labels = next(loader_batches)
    resident = itertools.repeat((images.clone(), labels.clone()))
    fed, kept = [], []
    for _ in range(rounds):
        fed.append(images_per_second(step, loader_batches, steps, warmup, sync))
        kept.append(images_per_second(step, resident, steps, warmup, sync))
    return {"loader": statistics.median(fed), "resident": statistics.median(kept),
            "ratio": statistics.median(f / k for f, k in zip(fed, kept)),
            "batch": int(images.shape[0]), "resolution": tuple(images.shape[-2:])}


def _loader_path(ctx: Context, name: str) -> str:
    if name == "ffcv":
        return "ToDevice to cuda" if ctx.cuda else f"CPU batches (ToDevice: {NO_CUDA})"
    if name == "dali":
        return "mixed decode on cuda" if ctx.cuda else f"CPU decode (mixed: {NO_CUDA})"
    return "pinned memory to cuda" if ctx.cuda else f"CPU batches (pinned memory: {NO_CUDA})"


def loader_row(ctx: Context, root: Path, name: str, steps: RecipeSteps) -> Row:
    from powergrad.config.schema import DataConfig
    from powergrad.data.images import build_image_loaders

    skipped = skip_reason(name)
    if skipped is not None:
        return Row(f"loader {name}", _loader_path(ctx, name), skipped)
    s = ctx.sizes
    cfg = DataConfig(dataset="imagefolder", loader=name, train_dir=str(root / "train"),
                     val_dir=str(root / "val"), train_beton=str(root / "train.beton"),
                     val_beton=str(root / "val.beton"), workers=s.workers, img_size=s.res,
                     num_classes=10)
    train, _ = build_image_loaders(cfg, batch_size=s.batch, eval_batch_size=s.batch, seed=0,
                                   device=ctx.device, channels_last=True)
    # the first pass: start-up (ffcv compiles, DALI builds), then loader-fed against resident
    result = feed_ratio(steps, endless(train), steps=max(1, len(train) - s.warmup - 1),
                        warmup=s.warmup, sync=ctx.sync, rounds=1)
    train.set_epoch(1)  # another pass: the loader alone
    batches = iter(train)
    next(batches)
    ctx.sync()
    start, alone = time.perf_counter(), 0
    for images, _ in batches:
        alone += images.shape[0]
    ctx.sync()
    alone_rate = alone / (time.perf_counter() - start)
    fed, cached_rate, ratio = result["loader"], result["resident"], result["ratio"]
    count = result["batch"] * max(1, len(train) - s.warmup - 1)
    ctx.feed_ratios[name] = ratio
    return Row(f"loader {name}", _loader_path(ctx, name), "pass",
               f"alone {alone_rate:.0f} img/s; ResNet-50 from it {fed:.0f} img/s, from a cached "
               f"batch {cached_rate:.0f} img/s: feed ratio {ratio:.2f} ({count} images timed)")


def gpu_hours_row(ctx: Context) -> Row:
    """Time per optimizer step of the paper recipe on one device at its own batch plan."""
    from powergrad.data.imagenet_archives import IMAGENET

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
    one_step = lambda i, l: steps.step([(i, l)] * accum)  # noqa: E731  (accum micro-batches)
    rate = images_per_second(one_step, itertools.repeat((images, labels)),
                             ctx.sizes.step_repeats, 2, ctx.sync)
    seconds_per_step = micro * accum / rate
    path = f"{micro} x {accum} accumulation, {res} px, {ctx.device.type}"
    if not ctx.cuda:
        return Row("gpu-hours", path, NO_CUDA,
                   f"(the step code ran: {seconds_per_step:.2f} s per step at this tiny size)")
    global_batch = micro * accum
    steps_per_epoch = IMAGENET.train_images // global_batch
    epochs = steps.training.total_epochs  # the schedule's cool-down too
    hours = seconds_per_step * steps_per_epoch * epochs / 3600
    loaders = "; ".join(f"fed by {name} (ratio {r:.2f}): {hours / r:.0f}"
                        for name, r in ctx.feed_ratios.items() if r > 0)
    return Row("gpu-hours", path, "pass",
               f"{seconds_per_step:.3f} s per step of {global_batch} x {steps_per_epoch} steps "
               f"x {epochs} epochs = {hours:.0f} GPU-hours, compute alone"
               + (f"; {loaders}" if loaders else ""))
