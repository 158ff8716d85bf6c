"""Does the loader keep the GPU busy? Trains a recipe's model (channels_last, AMP) for a fixed
number of steps from the recipe's train loader, then from one batch kept on the device, and
prints the ratio of the two rates: 1.0 means the GPU never waits for data.

    python tools/gpu_saturation.py recipes/ffcv_imagenet/rn50_88_epochs.yaml --steps 100
    python tools/gpu_saturation.py recipes/ffcv_imagenet/rn50_88_epochs.yaml data.workers=8

Run it on the training machine with the data the recipe names, one process per GPU as the
run will be (pick the GPU with CUDA_VISIBLE_DEVICES), and with the data.workers the run will
have: cores / GPUs. Rounds alternate loader and resident batch; the ratio is the median over
rounds. The same code runs on a CPU with --device cpu (tests/test_gpu_saturation.py runs it
with a tiny model and images): only the device and its synchronisation change.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

# the training step `powergrad gpu-check` times: the recipe's model (channels_last), loss,
# optimizer, autocast and GradScaler
from powergrad.commands.gpu_throughput import RecipeSteps
from powergrad.config.loading import RecipeError, load_recipe
from powergrad.data import TrainLoader, build_loaders
from powergrad.data.imagefolder_checks import ImageDataError
from powergrad.errors import one_error_path, whole_number
from powergrad.system.distributed import DistInfo
from powergrad.training.builders import AMP_DTYPES, pick_device
from powergrad.training.machine_fit import fit_to_machine, usable_cores


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
    """Train `warmup` steps untimed, then `steps` timed steps on the next batches."""
    for _ in range(warmup):
        step(*next(batches))
    sync()
    start, count = time.perf_counter(), 0
    for _ in range(steps):
        images, labels = next(batches)
        step(images, labels)
        count += images.shape[0]
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


def amp_dtype_for(name: str) -> torch.dtype:
    """The autocast dtype `name` (a recipe's, as fitted to the machine); bfloat16 for float32
    (the check is about AMP)."""
    return AMP_DTYPES[name] or torch.bfloat16


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("recipe", help="recipe YAML whose data and model to use")
    p.add_argument("overrides", nargs="*", help="key=value recipe settings, e.g. data.workers=8")
    p.add_argument("--steps", type=whole_number(1), default=100, help="timed steps per round (default 100)")
    p.add_argument("--warmup", type=whole_number(0), default=10,
                   help="untimed steps before each round: ffcv compiles, cuDNN picks its "
                        "kernels (default 10)")
    p.add_argument("--rounds", type=whole_number(1), default=2, help="loader/resident rounds (default 2)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="default: the recipe's train.device")
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    device = pick_device(args.device or recipe.train.device)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fit = fit_to_machine(recipe, device, recipe.train.batch_size)  # workers, fp16 on a CPU
    amp_dtype = amp_dtype_for(fit.amp_dtype)
    for note in fit.notes:
        print(f"note: {note}")
    train_loader, _ = build_loaders(
        fit.data, batch_size=recipe.train.batch_size,
        eval_batch_size=recipe.train.eval_batch_size, seed=recipe.train.seed, device=device,
        dist_info=DistInfo(), channels_last=True)
    sync = synchronizer(device)
    step = RecipeSteps(recipe, device, amp_dtype, sync)
    result = feed_ratio(step, endless(train_loader), args.steps, args.warmup, sync, args.rounds)
    cores = usable_cores()
    print(f"{recipe.model.model} on {device} ({str(amp_dtype).removeprefix('torch.')} autocast, "
          f"channels_last), batch {result['batch']} at {result['resolution'][0]} px, "
          f"{fit.data.workers} loader workers, {cores} cores visible\n"
          f"from the loader:       {result['loader']:.0f} img/s\n"
          f"from a resident batch: {result['resident']:.0f} img/s\n"
          f"ratio {result['ratio']:.2f} (1.0 = the GPU never waits for data; median of "
          f"{args.rounds} rounds of {args.steps} steps)")
    if result["ratio"] < 0.95:
        print("the device waits for data: give the loader more workers, or write the .beton "
              "with more raw images (results/bench_loader.md gives cores per GPU per setting)")
    return result


def _command() -> int:
    main()
    return 0


if __name__ == "__main__":
    sys.exit(one_error_path("gpu_saturation", _command, expected=(RecipeError, ImageDataError)))
