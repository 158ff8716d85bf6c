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
import sys

import torch

# the training step `powergrad gpu-check` times: the recipe's model (channels_last), loss,
# optimizer, autocast and GradScaler
# the feed ratio and its timing are gpu-check's own (one function for both)
from powergrad.commands.arguments import whole_number
from powergrad.commands.gpu_throughput import RecipeSteps, endless, feed_ratio, synchronizer
from powergrad.config.loading import RecipeError, load_recipe
from powergrad.data.imagefolder_checks import ImageDataError
from powergrad.errors import one_error_path
from powergrad.training.builders import AMP_DTYPES, pick_device
from powergrad.training.machine_fit import usable_cores
from powergrad.training.setup import build_training


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
    # the engine's own set-up (cudnn.benchmark on a GPU included): the loader, model,
    # optimizer and loss the run will have
    training = build_training(recipe, device=device)
    fit, train_loader = training.fit, training.train_loader
    amp_dtype = amp_dtype_for(fit.amp_dtype)
    for note in training.notes:
        print(f"note: {note}")
    sync = synchronizer(device)
    step = RecipeSteps(recipe, device, amp_dtype, sync, training=training)
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
