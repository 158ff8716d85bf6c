"""What a recipe becomes on the machine it runs on, decided once and said in one note line
each: fp16 autocast on a CPU, more loader workers than cores, the loader `auto` picks, and an
lr left unchanged when the total batch was changed on the command line.

Nothing here changes the recipe (its digest and recipe.yaml stay those of the file); the
engine runs with the returned values, prints the notes and records them in final.json.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from powergrad.config.loading import file_value
from powergrad.config.schema import Recipe


@dataclass
class MachineFit:
    data: object  # the recipe's DataConfig with the workers this machine can run
    amp_dtype: str  # the autocast dtype used: the recipe's, or bfloat16 for fp16 on a CPU
    loader: str  # fashion_mnist, ffcv, torchvision or dali
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """What final.json keeps of it."""
        return {"loader": self.loader, "amp_dtype": self.amp_dtype,
                "workers": self.data.workers, "notes": list(self.notes)}


def usable_cores() -> int:
    """The cores this process may run on (a SLURM job's or taskset's share, not the node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def fit_to_machine(recipe: Recipe, device: torch.device, images_per_step: int) -> MachineFit:
    notes = []
    data = recipe.data
    amp = recipe.train.amp_dtype
    if amp == "float16" and device.type == "cpu":
        # The CPU has no fast fp16 kernels (the recipes' fp16 is for GPUs); bf16 autocast is.
        notes.append("train.amp_dtype float16 is for GPUs (fp16 autocast is very slow on a "
                     "CPU): using bfloat16 autocast on this CPU")
        amp = "bfloat16"
    cores = usable_cores()
    if data.dataset == "imagefolder" and data.workers > cores:
        # ffcv refuses more threads than cores; torchvision workers beyond them only compete
        notes.append(f"data.workers {data.workers} is more than the {cores} core(s) this "
                     f"process may use: using {cores}")
        data = dataclasses.replace(data, workers=cores)
    loader, why = chosen_loader(data)
    if why:
        notes.append(f"data.loader auto: {why}")
    lr_note = unchanged_lr_note(recipe, images_per_step)
    if lr_note:
        notes.append(lr_note)
    return MachineFit(data, amp, loader, notes)


def chosen_loader(data) -> tuple[str, str]:
    """(the loader that reads `data`, why auto chose it: '' when chosen by name)."""
    if data.dataset == "fashion_mnist":
        return "fashion_mnist", ""
    from powergrad.data.images import choose_loader

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        loader = choose_loader(data)
    if data.loader != "auto":
        return loader, ""
    if said:  # choose_loader's own words: "data.loader auto: using torchvision on ... because"
        return loader, str(said[0].message).removeprefix("data.loader auto: ")
    return loader, "using ffcv: both .beton files are set and ffcv imports"


def unchanged_lr_note(recipe: Recipe, images_per_step: int) -> str:
    """A note when the total batch differs from the recipe file's and the lr was not given
    with it: the lr was tuned for the file's batch (timm's rule of thumb: scale linearly)."""
    origin = recipe.origins.get("train.global_batch", "")
    if not origin.startswith("command line") or \
            recipe.origins.get("optim.lr", "").startswith("command line"):
        return ""
    tuned_for = file_value(recipe, "train.global_batch")
    if not tuned_for or tuned_for == images_per_step:
        return ""
    linear = recipe.optim.lr * images_per_step / tuned_for
    return (f"train.global_batch {images_per_step} from the command line, but optim.lr stays "
            f"{recipe.optim.lr:g}, set for {tuned_for} images per step; scaled linearly it "
            f"would be optim.lr={linear:.4g}")


def channels_last_hazard(model: nn.Module, device: torch.device) -> str | None:
    """Why channels_last must stay off for this model on this device, or None.

    On the CPU, oneDNN's channels-last backward of a 1x1 convolution with stride 2 and an
    input channel count that is not a multiple of 8 corrupts the heap (torch 2.14.1 on an
    AVX2 machine here: glibc aborts with "corrupted double-linked list"; 8 or 16 channels, or
    the default memory format, run). ResNet downsample layers of tiny nets have that shape."""
    if device.type != "cpu":
        return None
    for name, module in model.named_modules():
        if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
                and module.stride != (1, 1) and module.in_channels % 8):
            return (f"train.channels_last is off on the CPU for this model: {name} (1x1, stride "
                    f"{module.stride[0]}, {module.in_channels} input channels) crashes oneDNN's "
                    "channels-last backward; a multiple of 8 channels avoids it")
    return None
