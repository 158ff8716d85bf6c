"""Checks that need more than the recipe file, run for every recipe of a command line before
the first one trains: the model builds, the device exists, the total batch fits this launch,
the resume checkpoint loads, the data is there with the classes and channels the model
expects, an epoch holds at least one optimizer step, and each recipe has a run directory of
its own.

config/loading.py checks what a file can say wrong by itself (keys, types, ranges); this module looks
at the machine and the disk, reading as little as it can: IDX headers, .beton headers and
sidecars, ImageFolder listings (names only, no image opened: `powergrad check-data` opens
them all). Every failure is one RecipeError naming the file (or command line) that set the key,
the key, the value and what was expected.
"""
from __future__ import annotations

import os
from pathlib import Path

from powergrad.config.batching import BatchPlan, BatchPlanError, plan_batch
from powergrad.config.loading import fail_on
from powergrad.config.schema import Recipe
from powergrad.errors import one_line
from powergrad.system.distributed import LaunchError, process_device, world_from_env
from powergrad.training.preflight_data import (DataFacts, check_data_matches_model, image_sizes,
                                               inspect_data)


def preflight(recipe: Recipe, world_size: int | None = None) -> None:
    """Raise RecipeError for the first check `recipe` fails. world_size defaults to the
    launcher's (torchrun's or srun's; 1 without either)."""
    if world_size is None:
        world_size = world_from_env().world_size
    model = check_model_builds(recipe)
    check_device(recipe)
    plan = check_batch_plan(recipe, world_size)
    check_resume_file(recipe)
    data = inspect_data(recipe)
    check_data_matches_model(recipe, data)
    check_steps_per_epoch(recipe, plan, data)
    check_model_takes_images(recipe, plan, model)


def check_run_dirs(recipes: list[Recipe]) -> None:
    """Each recipe of a command line needs a run directory of its own: not one another
    recipe would write (two files named run.yaml in different folders share runs/run), and
    not one that holds a run of other settings (found now, not after the recipes before it
    have trained)."""
    from powergrad.training.rundir import RunDirError, check_same_recipe, run_dir_for

    first_by_dir: dict[Path, Recipe] = {}
    for recipe in recipes:
        run_dir = run_dir_for(recipe)
        name = recipe.log.experiment
        got = f"got {name!r}" if name else "not set, so the file name is used"
        first = first_by_dir.setdefault(run_dir.resolve(), recipe)
        if first is not recipe:
            fail_on(recipe, "log.experiment", f"{got}: {recipe.source} and {first.source} would "
                                            f"both write {run_dir}; expected one run directory "
                                            "per recipe (set log.experiment=NAME)")
        check_writable(recipe, "log.output", run_dir)
        try:
            check_same_recipe(run_dir, recipe)
        except RunDirError as err:
            fail_on(recipe, "log.experiment", f"{got}: {one_line(err)}")


def check_writable(recipe: Recipe, key: str, folder: Path) -> None:
    why = why_not_writable(folder)
    if why:
        fail_on(recipe, key, f"got {getattr(recipe.log, key.split('.')[1])!r}: {why}")


def why_not_writable(folder: str | Path) -> str | None:
    """Why files cannot be written into `folder` (made if missing), or None when they can:
    its nearest existing ancestor must be a folder this process may write (not a file, not
    on a read-only file system)."""
    folder = Path(folder).expanduser()
    nearest = folder
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        return (f"{nearest} is a file, so {folder} cannot be made; expected a folder (or a "
                "path that can be made one)")
    if not os.access(nearest, os.W_OK | os.X_OK):
        return (f"{nearest} is not writable by this user (or is on a read-only file system); "
                "expected a folder that can be written to")
    return None


def check_model_builds(recipe: Recipe):
    """Build the model and its optimizer on the meta device (no memory, no init cost) so a
    bad timm keyword or optimizer setting fails now, not after the data is set up; return
    that meta model for the checks that follow."""
    import torch

    from powergrad.training.builders import build_optimizer
    from powergrad.training.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(recipe.model)
    except (TypeError, ValueError, KeyError, IndexError, AssertionError, RuntimeError) as err:
        fail_on(recipe, "model.kwargs", f"timm cannot build {recipe.model.model!r} with these "
                                      f"settings: {type(err).__name__}: {one_line(err)}")
    check_initial_weights(recipe, model)
    try:
        build_optimizer(recipe, model)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as err:
        fail_on(recipe, "optim.opt", f"timm cannot build optimizer {recipe.optim.opt!r} with "
                                   f"the optim settings: {type(err).__name__}: "
                                   f"{one_line(err)}")
    return model


def check_initial_weights(recipe: Recipe, model) -> None:
    """model.pretrained's weights are on this machine; model.initial_checkpoint reads and
    fits the recipe's network (the classifier may differ: it is then re-initialised)."""
    from powergrad.training.finetune import cached_pretrained_file, load_initial_checkpoint
    from powergrad.training.weights import WeightsError

    cfg = recipe.model
    if cfg.pretrained and cached_pretrained_file(cfg.model) is None:
        fail_on(recipe, "model.pretrained", f"got true, but timm's weights for {cfg.model} are "
                                          "not in the Hugging Face cache and a run never "
                                          "downloads; fetch them once with `python -c \"import "
                                          f"timm; timm.create_model('{cfg.model}', "
                                          "pretrained=True)\"` where there is internet, or "
                                          "name a file with model.initial_checkpoint")
    if cfg.initial_checkpoint:
        try:
            load_initial_checkpoint(model, cfg, check_only=True)
        except WeightsError as err:
            fail_on(recipe, "model.initial_checkpoint", f"got {cfg.initial_checkpoint!r}: "
                                                      f"{one_line(err)}")


def check_device(recipe: Recipe) -> None:
    import torch

    from powergrad.system.gpus import GpuUnusable, refuse_unusable_gpu

    name = recipe.train.device
    if name != "cpu":  # NVIDIA GPUs torch cannot use: refused before the run folder is locked
        try:
            refuse_unusable_gpu()
        except GpuUnusable as err:
            fail_on(recipe, "train.device", f"got {name!r}: {err}")
    if name == "cuda" and not torch.cuda.is_available():
        fail_on(recipe, "train.device", "got 'cuda', but torch sees no CUDA device; expected "
                                      "cpu or auto on this machine")
    if name != "cpu" and torch.cuda.is_available():  # the launcher gives each process one GPU
        try:  # the rule build_training applies, refused here before any work
            process_device("cuda", world_from_env(), torch.cuda.device_count())
        except LaunchError as err:
            fail_on(recipe, "train.device", f"got {name!r}: {err}")


def check_batch_plan(recipe: Recipe, world_size: int) -> BatchPlan:
    """The batch plan for this launch; refuses a total batch it cannot give exactly."""
    train_cfg = recipe.train
    try:
        return plan_batch(train_cfg.global_batch, train_cfg.batch_size,
                          train_cfg.grad_accum_steps, world_size)
    except BatchPlanError as err:
        fail_on(recipe, "train.global_batch", str(err))


def check_resume_file(recipe: Recipe) -> None:
    """A checkpoint named in log.resume must exist and be one training can continue from
    (auto and none name no file; auto skips damaged checkpoints by itself)."""
    from powergrad.training.checkpoint import CheckpointError, read_training

    setting = recipe.log.resume
    if setting in ("auto", "none"):
        return
    try:
        read_training(Path(setting))
    except CheckpointError as err:
        fail_on(recipe, "log.resume", f"got {setting!r}: {one_line(err)}; expected a training "
                                    "checkpoint (last.pth or step-*.pth), auto or none")


def check_model_takes_images(recipe: Recipe, plan: BatchPlan, model) -> None:
    """One forward pass on the meta device (shapes only: no memory, no compute) at every
    image size the run uses: a model with a fixed input size (a ViT's patch grid) refuses
    the others now, not after the data is set up. Its activations' sizes at the training
    sizes give an estimate of one micro-batch's memory, refused when larger than the device
    holds (an estimate: refused only when it clearly cannot fit, never a tuning aid)."""
    import torch

    model.train()  # the meta model of check_model_builds
    largest, largest_key, eval_peak = 0, "data.img_size", 0
    for key, size in sorted(image_sizes(recipe).items(), key=lambda item: item[1]):
        try:  # two images: BatchNorm refuses one value per channel in training mode
            images = torch.empty(2, recipe.model.in_chans, size, size, device="meta")
            kept, widest = (n // 2 for n in _activation_bytes(model, images))
        except NotImplementedError:  # an op without a meta kernel: nothing to learn here
            return
        except (AssertionError, RuntimeError, ValueError) as err:
            expected = _fixed_input_size(model)
            fix = (f"expected {expected} (or set model.kwargs.img_size, which timm's ViTs "
                   "take)" if expected else "expected a size this model takes")
            fail_on(recipe, key, f"got {size}: {recipe.model.model} cannot take {size} x {size} "
                               f"images ({type(err).__name__}: {one_line(err)}); {fix}")
        if key != "data.val_img_size" and kept >= largest:  # training keeps every output
            largest, largest_key = kept, key
        if key == "data.val_img_size" or "data.val_img_size" not in image_sizes(recipe):
            eval_peak = max(eval_peak, 2 * widest)  # evaluation: a layer's input and output
    if recipe.train.amp_dtype != "float32":
        largest, eval_peak = largest // 2, eval_peak // 2  # autocast: mostly 16-bit
    # fp32 weights, gradients and up to two optimizer states, and the EMA's copy. Under DDP
    # the gradients are views into its buckets (gradient_as_bucket_view): nothing more.
    params = sum(p.numel() for p in model.parameters())
    fixed = (16 + 4 * recipe.train.model_ema) * params
    train_need = largest * plan.micro_batch
    eval_need = eval_peak * recipe.train.eval_batch_size
    need = fixed + max(train_need, eval_need)  # evaluation runs after the step's memory is free
    have, where = _device_memory(recipe)
    if have is None or need <= have:
        return
    if eval_need > train_need:
        fail_on(recipe, "train.eval_batch_size",
                f"got {recipe.train.eval_batch_size}: about {need / 2**30:.1f} GiB for "
                f"weights{', EMA' if recipe.train.model_ema else ''}, optimizer and the "
                f"evaluation of {recipe.train.eval_batch_size} images, but {where} has "
                f"{have / 2**30:.1f} GiB; expected a smaller evaluation batch")
    size = image_sizes(recipe)[largest_key]
    what = (f"about {need / 2**30:.1f} GiB for weights"
            f"{', EMA' if recipe.train.model_ema else ''}, optimizer and the activations of "
            f"{plan.micro_batch} images of {size} x {size} px, but {where} has "
            f"{have / 2**30:.1f} GiB")
    if fixed + largest > have:  # not even one image fits
        fail_on(recipe, largest_key, f"got {size}: {what}; expected a smaller image size")
    fail_on(recipe, "train.batch_size", f"got {recipe.train.batch_size} ({plan.micro_batch} "
                                      f"images per micro-batch): {what}; expected a smaller "
                                      "batch (train.batch_size; train.global_batch is kept "
                                      "by accumulation)")


def _activation_bytes(model, images) -> tuple[int, int]:
    """(bytes of every module's output for `images`: what backward keeps, roughly; the
    largest single output). In-place modules share their input's memory and are not
    counted."""
    import torch

    total = widest = 0

    def count(module, inputs, output):
        nonlocal total, widest
        if getattr(module, "inplace", False):
            return
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(out, torch.Tensor):
                total += out.numel() * out.element_size()
                widest = max(widest, out.numel() * out.element_size())

    handles = [m.register_forward_hook(count) for m in model.modules()
               if not list(m.children())]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return total, widest


def _fixed_input_size(model) -> int | None:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    return size[0] if isinstance(size, (tuple, list)) else size


def _device_memory(recipe: Recipe) -> tuple[int | None, str]:
    """(bytes the training device holds, its name); None when it cannot be told."""
    import torch

    if recipe.train.device != "cpu" and torch.cuda.is_available():
        # check_device ran first: the rule gives this process a device
        index = process_device("cuda", world_from_env(), torch.cuda.device_count()).index
        free, _ = torch.cuda.mem_get_info(index)  # what other processes left of it
        return free, f"cuda:{index}'s free memory"
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        free = int(fields["MemAvailable"].split()[0]) * 1024
        share = world_from_env().local_world_size  # the node's processes share its memory
        return free // share, ("this machine's free memory" if share == 1 else
                               f"this process's share ({share} per node) of the free memory")
    except (OSError, KeyError, ValueError):
        return None, ""


def check_steps_per_epoch(recipe: Recipe, plan: BatchPlan, data: DataFacts) -> None:
    """An epoch must hold at least one optimizer step: every process fills `accum_steps`
    micro-batches (the loaders drop an incomplete last batch)."""
    steps = data.train_images // (plan.micro_batch * plan.world_size) // plan.accum_steps
    if steps >= 1:
        return
    # Name the setting most likely at fault; the message shows every factor.
    train_cfg = recipe.train
    if train_cfg.global_batch is not None:
        key, value = "train.global_batch", train_cfg.global_batch
    elif plan.accum_steps > 1 and data.train_images >= plan.micro_batch * plan.world_size:
        key, value = "train.grad_accum_steps", train_cfg.grad_accum_steps
    elif data.train_images < data.train_images_all:
        key, value = "data.train_subset", recipe.data.train_subset
    else:
        key, value = "train.batch_size", train_cfg.batch_size
    fail_on(recipe, key, f"got {value}: {data.train_images} training images ({data.where}) "
                       f"// ({plan.micro_batch} images x {plan.world_size} process(es)) "
                       f"// {plan.accum_steps} accumulation step(s) = 0 optimizer steps per "
                       f"epoch; expected at least 1")
