"""Checks that need more than the recipe file, run for every recipe of a command line before
the first one trains: the model builds, the device exists, the total batch fits this launch,
the resume checkpoint loads, the data is there with the classes and channels the model
expects, an epoch holds at least one optimizer step, and each recipe has a run directory of
its own.

recipe.py checks what a file can say wrong by itself (keys, types, ranges); this module looks
at the machine and the disk, reading as little as it can: IDX headers, .beton headers and
sidecars, ImageFolder listings (names only, no image opened: `powergrad check-data` opens
them all). Every failure is one RecipeError naming the file (or command line) that set the key,
the key, the value and what was expected.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from powergrad.config.batching import BatchPlan, BatchPlanError, plan_batch
from powergrad.config.loading import RecipeError
from powergrad.config.schema import Recipe
from powergrad.system.distributed import cuda_index, world_from_env


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
    from powergrad.training.engine import run_dir_for
    from powergrad.training.rundir import RunDirError, check_same_recipe

    first_by_dir: dict[Path, Recipe] = {}
    for recipe in recipes:
        run_dir = run_dir_for(recipe)
        name = recipe.log.experiment
        got = f"got {name!r}" if name else "not set, so the file name is used"
        first = first_by_dir.setdefault(run_dir.resolve(), recipe)
        if first is not recipe:
            _fail(recipe, "log.experiment", f"{got}: {recipe.source} and {first.source} would "
                                            f"both write {run_dir}; expected one run directory "
                                            "per recipe (set log.experiment=NAME)")
        check_writable(recipe, "log.output", run_dir)
        try:
            check_same_recipe(run_dir, recipe)
        except RunDirError as err:
            _fail(recipe, "log.experiment", f"{got}: {_one_line(err)}")


def check_writable(recipe: Recipe, key: str, folder: Path) -> None:
    why = why_not_writable(folder)
    if why:
        _fail(recipe, key, f"got {getattr(recipe.log, key.split('.')[1])!r}: {why}")


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


def _fail(recipe: Recipe, key: str, message: str):
    raise RecipeError(recipe.origins.get(key, recipe.source), key, message)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


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
        _fail(recipe, "model.kwargs", f"timm cannot build {recipe.model.model!r} with these "
                                      f"settings: {type(err).__name__}: {_one_line(err)}")
    check_initial_weights(recipe, model)
    try:
        build_optimizer(recipe, model)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as err:
        _fail(recipe, "optim.opt", f"timm cannot build optimizer {recipe.optim.opt!r} with "
                                   f"the optim settings: {type(err).__name__}: "
                                   f"{_one_line(err)}")
    return model


def check_initial_weights(recipe: Recipe, model) -> None:
    """model.pretrained's weights are on this machine; model.initial_checkpoint reads and
    fits the recipe's network (the classifier may differ: it is then re-initialised)."""
    from powergrad.training.finetune import cached_pretrained_file, load_initial_checkpoint
    from powergrad.training.weights import WeightsError

    cfg = recipe.model
    if cfg.pretrained and cached_pretrained_file(cfg.model) is None:
        _fail(recipe, "model.pretrained", f"got true, but timm's weights for {cfg.model} are "
                                          "not in the Hugging Face cache and a run never "
                                          "downloads; fetch them once with `python -c \"import "
                                          f"timm; timm.create_model('{cfg.model}', "
                                          "pretrained=True)\"` where there is internet, or "
                                          "name a file with model.initial_checkpoint")
    if cfg.initial_checkpoint:
        try:
            load_initial_checkpoint(model, cfg, check_only=True)
        except WeightsError as err:
            _fail(recipe, "model.initial_checkpoint", f"got {cfg.initial_checkpoint!r}: "
                                                      f"{_one_line(err)}")


def check_device(recipe: Recipe) -> None:
    import torch

    name = recipe.train.device
    if name == "cuda" and not torch.cuda.is_available():
        _fail(recipe, "train.device", "got 'cuda', but torch sees no CUDA device; expected "
                                      "cpu or auto on this machine")
    if name != "cpu" and torch.cuda.is_available():  # the launcher gives each process one GPU
        local_rank, count = world_from_env().local_rank, torch.cuda.device_count()
        if cuda_index(local_rank, count) is None:
            _fail(recipe, "train.device", f"got {name!r} in the process with LOCAL_RANK "
                                          f"{local_rank}, but only {count} CUDA device(s) are "
                                          f"visible; expected at most {count} processes per node")


def check_batch_plan(recipe: Recipe, world_size: int) -> BatchPlan:
    """The batch plan for this launch; refuses a total batch it cannot give exactly."""
    train_cfg = recipe.train
    try:
        return plan_batch(train_cfg.global_batch, train_cfg.batch_size,
                          train_cfg.grad_accum_steps, world_size)
    except BatchPlanError as err:
        _fail(recipe, "train.global_batch", str(err))


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
        _fail(recipe, "log.resume", f"got {setting!r}: {_one_line(err)}; expected a training "
                                    "checkpoint (last.pth or step-*.pth), auto or none")


@dataclass(frozen=True)
class DataFacts:
    """What the data holds, read without loading it."""
    where: str  # the data as a reader of the message knows it
    num_classes: int
    channels: int
    train_images: int  # after data.train_subset
    train_images_all: int  # before data.train_subset


def inspect_data(recipe: Recipe) -> DataFacts:
    """Find the data, check it is readable, and count it (ImageFolder trees are listed whole:
    a few seconds for ImageNet's 1.3 M files, and every stray file is found now)."""
    if recipe.data.dataset == "fashion_mnist":
        facts = _fashion_mnist_facts(recipe)
    else:
        facts = _image_facts(recipe)
    subset = recipe.data.train_subset
    if subset is not None and subset < facts.train_images:
        facts = DataFacts(facts.where, facts.num_classes, facts.channels, subset,
                          facts.train_images_all)
    return facts


def _fashion_mnist_facts(recipe: Recipe) -> DataFacts:
    from powergrad.data.fashion_mnist import CLASS_NAMES, split_size

    check_augmentation(recipe, "fashion_mnist")
    root = recipe.data.root
    try:
        train_images = split_size(root, "train")
        test_images = split_size(root, "test")
    except (OSError, EOFError, ValueError) as err:  # missing, not gzip, cut short, bad header
        _fail(recipe, "data.root", f"got {root!r}: {_one_line(err)}")
    if not train_images or not test_images:
        _fail(recipe, "data.root", f"got {root!r}: {train_images} train and {test_images} "
                                   "test images; expected both splits to hold images")
    return DataFacts(f"Fashion-MNIST at {root}", len(CLASS_NAMES), 1, train_images, train_images)


def _image_facts(recipe: Recipe) -> DataFacts:
    from powergrad.data.imagefolder_checks import ImageDataError
    from powergrad.data.images import choose_loader

    data_cfg = recipe.data
    try:
        with warnings.catch_warnings():  # the loader repeats its own fallback warning
            warnings.simplefilter("ignore")
            backend = choose_loader(data_cfg)
    except (ValueError, ImportError) as err:
        _fail(recipe, "data.loader", f"got {data_cfg.loader!r}: {_one_line(err)}")
    check_augmentation(recipe, backend)
    if backend == "dali" and data_cfg.bad_images == "skip":
        _fail(recipe, "data.bad_images", "got 'skip', but DALI decodes inside its pipeline and "
                                         "cannot skip a file; expected error with data.loader "
                                         "dali (`powergrad check-data` lists bad files first)")
    if backend == "ffcv":
        from powergrad.data.beton_meta import read_beton_info

        infos = []
        for key in ("data.train_beton", "data.val_beton"):
            try:
                infos.append(read_beton_info(getattr(data_cfg, key.split(".")[1]),
                                             data_cfg.num_classes))
            except ImageDataError as err:
                _fail(recipe, key, _one_line(err))
        train, val = infos
        _check_same_classes(recipe, "data.val_beton", train.class_names, val.class_names)
        return DataFacts(f".beton {data_cfg.train_beton}", train.num_classes, 3,
                         train.num_samples, train.num_samples)
    train_classes, train_count = _scan_folder(recipe, "data.train_dir")
    val_classes, _ = _scan_folder(recipe, "data.val_dir")
    _check_same_classes(recipe, "data.val_dir", train_classes, val_classes)
    return DataFacts(f"ImageFolder {data_cfg.train_dir}", len(train_classes), 3, train_count,
                     train_count)


def check_augmentation(recipe: Recipe, loader: str) -> None:
    """timm's augmentation keys are the torchvision loader's: another loader refuses them
    (one line naming the loader that can), and data.aa must be a policy timm parses."""
    from powergrad.data.augment import colour_transforms, settings_in_use

    used = settings_in_use(recipe.data, loader)
    if used:
        key = used[0]
        _fail(recipe, key, f"got {getattr(recipe.data, key.split('.')[1])!r}, but the {loader} "
                           "loader does not do it; expected data.loader: torchvision (the "
                           "loader with timm's augmentations) or the key left unset")
    if recipe.data.aa:
        try:
            colour_transforms(recipe.data, recipe.data.img_size)
        except (AssertionError, KeyError, ValueError, IndexError) as err:
            _fail(recipe, "data.aa", f"got {recipe.data.aa!r}: timm cannot parse it "
                                     f"({type(err).__name__}: {_one_line(err)}); expected a "
                                     "policy such as rand-m9-mstd0.5-inc1 or original")


def _scan_folder(recipe: Recipe, key: str) -> tuple[list[str], int]:
    """(class names, image count) of the ImageFolder tree `key` names, listed as the loader
    will list it; a missing tree, a class folder without images or a file that is not an
    image fails here (every such file counted in the message), not hours into an epoch."""
    from powergrad.data.imagefolder_checks import ImageDataError, scan_image_folder

    root = getattr(recipe.data, key.split(".")[1])
    tree = f"expected an ImageFolder tree ({root}/<class>/<image>)"
    if not Path(root).is_dir():
        _fail(recipe, key, f"got {root!r}: no such directory; {tree}")
    problems: list[str] = []
    try:
        classes, samples = scan_image_folder(root, problems=problems)
    except (ImageDataError, OSError) as err:  # no class folders; an unreadable folder
        _fail(recipe, key, f"got {root!r}: {_one_line(err)}; {tree}")
    if problems:
        more = f" (and {len(problems) - 1} more: `powergrad check-data {root}` lists them)" \
            if len(problems) > 1 else ""
        _fail(recipe, key, f"got {root!r}: {problems[0]}{more}")
    return classes, len(samples)


def _check_same_classes(recipe: Recipe, val_key: str, train_classes: list[str],
                        val_classes: list[str]) -> None:
    if train_classes != val_classes:
        differ = sorted(set(train_classes) ^ set(val_classes))[:5]
        _fail(recipe, val_key, f"got {getattr(recipe.data, val_key.split('.')[1])!r} with "
                               f"{len(val_classes)} classes; expected the same classes as the "
                               f"training data's {len(train_classes)} (differing: {differ})")


def check_data_matches_model(recipe: Recipe, data: DataFacts) -> None:
    if recipe.model.num_classes != data.num_classes:
        _fail(recipe, "model.num_classes", f"got {recipe.model.num_classes}, but {data.where} "
                                           f"has {data.num_classes} classes; expected "
                                           f"{data.num_classes}")
    if recipe.data.num_classes is not None and recipe.data.num_classes != data.num_classes:
        _fail(recipe, "data.num_classes", f"got {recipe.data.num_classes}, but {data.where} "
                                          f"has {data.num_classes} classes")
    if recipe.model.in_chans != data.channels:
        _fail(recipe, "model.in_chans", f"got {recipe.model.in_chans}, but {data.where} has "
                                        f"{data.channels}-channel images; expected "
                                        f"{data.channels}")


def image_sizes(recipe: Recipe) -> dict[str, int]:
    """The square image sizes the model will see, by the key that sets each."""
    data = recipe.data
    if data.dataset == "fashion_mnist":
        return {"data.dataset": 28}  # the loader's own 28 x 28
    sizes = {"data.img_size": data.img_size} if data.min_res is None else \
        {"data.min_res": data.min_res, "data.max_res": data.max_res}
    sizes["data.val_img_size" if data.val_img_size else "data.img_size"] = \
        data.val_img_size or data.img_size
    return sizes


def check_model_takes_images(recipe: Recipe, plan: BatchPlan, model) -> None:
    """One forward pass on the meta device (shapes only: no memory, no compute) at every
    image size the run uses: a model with a fixed input size (a ViT's patch grid) refuses
    the others now, not after the data is set up. Its activations' sizes at the training
    sizes give an estimate of one micro-batch's memory, refused when larger than the device
    holds (an estimate: refused only when it clearly cannot fit, never a tuning aid)."""
    import torch

    model.train()  # the meta model of check_model_builds
    largest, largest_key = 0, "data.img_size"
    for key, size in sorted(image_sizes(recipe).items(), key=lambda item: item[1]):
        try:  # two images: BatchNorm refuses one value per channel in training mode
            images = torch.empty(2, recipe.model.in_chans, size, size, device="meta")
            per_image = _activation_bytes(model, images) // 2
        except NotImplementedError:  # an op without a meta kernel: nothing to learn here
            return
        except (AssertionError, RuntimeError, ValueError) as err:
            expected = _fixed_input_size(model)
            fix = (f"expected {expected} (or set model.kwargs.img_size, which timm's ViTs "
                   "take)" if expected else "expected a size this model takes")
            _fail(recipe, key, f"got {size}: {recipe.model.model} cannot take {size} x {size} "
                               f"images ({type(err).__name__}: {_one_line(err)}); {fix}")
        training = key != "data.val_img_size"  # evaluation keeps no activations
        if training and per_image >= largest:
            largest, largest_key = per_image, key
    if recipe.train.amp_dtype != "float32":
        largest //= 2  # autocast keeps most activations in 16 bits
    # fp32 weights, gradients and up to two optimizer states; activations kept for backward
    fixed = 16 * sum(p.numel() for p in model.parameters())
    need = fixed + largest * plan.micro_batch
    have, where = _device_memory(recipe)
    if have is None or need <= have:
        return
    size = image_sizes(recipe)[largest_key]
    what = (f"about {need / 2**30:.1f} GiB for weights, optimizer and the activations of "
            f"{plan.micro_batch} images of {size} x {size} px, but {where} has "
            f"{have / 2**30:.1f} GiB")
    if fixed + largest > have:  # not even one image fits
        _fail(recipe, largest_key, f"got {size}: {what}; expected a smaller image size")
    _fail(recipe, "train.batch_size", f"got {recipe.train.batch_size} ({plan.micro_batch} "
                                      f"images per micro-batch): {what}; expected a smaller "
                                      "batch (train.batch_size; train.global_batch is kept "
                                      "by accumulation)")


def _activation_bytes(model, images) -> int:
    """Bytes of every module's output for `images` (what backward keeps, roughly; in-place
    modules share their input's memory and are not counted)."""
    import torch

    total = 0

    def count(module, inputs, output):
        nonlocal total
        if getattr(module, "inplace", False):
            return
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(out, torch.Tensor):
                total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(count) for m in model.modules()
               if not list(m.children())]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return total


def _fixed_input_size(model) -> int | None:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    return size[0] if isinstance(size, (tuple, list)) else size


def _device_memory(recipe: Recipe) -> tuple[int | None, str]:
    """(bytes the training device holds, its name); None when it cannot be told."""
    import torch

    if recipe.train.device != "cpu" and torch.cuda.is_available():
        index = cuda_index(world_from_env().local_rank, torch.cuda.device_count()) or 0
        return torch.cuda.get_device_properties(index).total_memory, f"cuda:{index}"
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
    _fail(recipe, key, f"got {value}: {data.train_images} training images ({data.where}) "
                       f"// ({plan.micro_batch} images x {plan.world_size} process(es)) "
                       f"// {plan.accum_steps} accumulation step(s) = 0 optimizer steps per "
                       f"epoch; expected at least 1")
