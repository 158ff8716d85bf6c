"""`powergrad describe RECIPE [key=value ...]`: what a recipe will train, without loading data.

Prints the resolved settings with the file each came from, the model and its parameter count,
the optimizer's parameter groups (with and without weight decay), what gradient clipping
leaves out, the batch arithmetic for common launches, the learning rate at key epochs and the
epoch count, and the paper's numbers; writes a PNG of the lr and the PGT alpha over training.
Everything is built by the engine's own set-up (training/setup.py: build_training).
"""
from __future__ import annotations

import sys
from pathlib import Path

from powergrad.commands.train import split_items
from powergrad.config.batching import BatchPlanError, plan_batch
from powergrad.config.loading import RecipeError, load_recipe
from powergrad.config.schema import Recipe
from powergrad.data.imagenet_archives import IMAGENET
from powergrad.training.setup import Training, build_training

WORLD_SIZES = (1, 4, 8, 16)  # one GPU, one 4-GPU node (the paper's), one 8-GPU node, 2 nodes
FASHION_MNIST_TRAIN_IMAGES = 60_000


def train_images(recipe: Recipe) -> tuple[int, str]:
    """(images per epoch, where that number comes from) without opening the data."""
    data_cfg = recipe.data
    if data_cfg.dataset == "fashion_mnist":
        count, why = FASHION_MNIST_TRAIN_IMAGES, "Fashion-MNIST's train set"
    elif recipe.model.num_classes == 1000:
        count, why = IMAGENET.train_images, "ImageNet-1k's train set, assumed"
    else:
        count, why = 100 * (recipe.train.global_batch or recipe.train.batch_size), \
            "unknown data set: 100 steps assumed"
    if data_cfg.train_subset is not None and data_cfg.train_subset < count:
        count, why = data_cfg.train_subset, "data.train_subset"
    return count, why


def lr_schedule(training: Training):
    """lr_at(epoch position) from the run's own timm scheduler (build_training's)."""
    updates_per_epoch, optimizer = training.updates_per_epoch, training.optimizer

    def lr_at(epoch: float) -> float:
        training.scheduler.step_update(num_updates=round(epoch * updates_per_epoch))
        return optimizer.param_groups[0]["lr"]
    return lr_at


def key_epochs(recipe: Recipe, total_epochs: int) -> list[float]:
    sched_cfg = recipe.sched
    marks = {0.0, sched_cfg.warmup_epochs / 2, float(sched_cfg.warmup_epochs),
             recipe.train.epochs / 2, recipe.train.epochs - 1.0, float(recipe.train.epochs),
             total_epochs - 1.0}
    if sched_cfg.sched == "multistep":
        marks.update(float(m) for m in sched_cfg.decay_milestones)
    if sched_cfg.sched == "step":
        marks.update(sched_cfg.decay_epochs * k for k in range(1, int(total_epochs
                                                                       // sched_cfg.decay_epochs) + 1))
    return sorted(m for m in marks if 0 <= m < total_epochs)


def _augmentation(recipe: Recipe) -> str:
    """The training augmentation as the loader that reads the data will apply it."""
    from powergrad.data.augment import describe_pipeline
    from powergrad.training.machine_fit import chosen_loader

    try:
        loader = chosen_loader(recipe.data)[0]
    except (ValueError, ImportError):  # no data named that a loader can read: the setting
        loader = recipe.data.loader
    loss = recipe.loss
    mixing = (f"; mixup {loss.mixup:g} / cutmix {loss.cutmix:g} (prob {loss.mixup_prob:g}, "
              f"switch {loss.mixup_switch_prob:g})" if loss.mixup or loss.cutmix else "")
    if loader == "dali":  # DALI's own pipeline: a crop-decode, RandAugment from its auto_aug
        from powergrad.data.dali_augment import describe_dali_pipeline
        return describe_dali_pipeline(recipe.data, mixing)
    return describe_pipeline(recipe.data, loader) + mixing


def describe(recipe: Recipe, png: Path | None = None) -> str:
    lines = [f"recipe {recipe.source}  (digest {recipe.digest()})",
             f"  {recipe.description}" if recipe.description else ""]
    lines += ["", "settings (value  <- where it was set; unmarked: the built-in default)"]
    for key, value in recipe.flat().items():
        origin = recipe.origins.get(key)
        lines.append(f"  {key} = {value!r}" + (f"  <- {origin}" if origin else ""))

    lines += ["", f"augmentation: {_augmentation(recipe)}"]
    images, why = train_images(recipe)
    step_batch = plan_batch(recipe.train.global_batch, recipe.train.batch_size,
                            recipe.train.grad_accum_steps, 1).global_batch
    updates_per_epoch = max(1, images // step_batch)
    # the engine's own set-up, without data and without loading weights
    training = build_training(recipe, with_data=False, with_weights=False,
                              updates_per_epoch=updates_per_epoch, device="cpu")
    model, optimizer, total_epochs = training.model, training.optimizer, training.total_epochs
    names = {id(p): n for n, p in model.named_parameters()}
    total = sum(p.numel() for p in model.parameters())
    lines += ["", f"model {recipe.model.model}: {total:,} parameters ({total / 1e6:.2f} M)"]
    lines.append(f"optimizer {type(optimizer).__name__} ({recipe.optim.opt}), parameter groups:")
    for group in optimizer.param_groups:
        params = group["params"]
        example = ", ".join(names[id(p)] for p in params[:3])
        lines.append(f"  weight_decay {group['weight_decay']:g}: {len(params)} tensors, "
                     f"{sum(p.numel() for p in params):,} values (e.g. {example})")
    clip_cfg = recipe.clip
    if clip_cfg.clip_mode == "none":
        lines.append("gradient clipping: none")
    else:
        kept = {id(p) for p in training.clip_params}
        left_out = [n for n, p in model.named_parameters() if id(p) not in kept]
        lines.append(f"gradient clipping: {clip_cfg.clip_mode} at {clip_cfg.clip_grad:g}; "
                     f"left out: {', '.join(left_out) or 'nothing'}")

    sync = "on (train.sync_bn)" if recipe.train.sync_bn else "off"
    lines += ["", "batch (train.global_batch "
              f"{recipe.train.global_batch}, train.batch_size {recipe.train.batch_size}; "
              f"BatchNorm synchronised over processes: {sync}):"]
    for world_size in WORLD_SIZES:
        try:
            plan = plan_batch(recipe.train.global_batch, recipe.train.batch_size,
                              recipe.train.grad_accum_steps, world_size)
            bn = (plan.micro_batch * world_size if recipe.train.sync_bn and world_size > 1
                  else plan.micro_batch)
            lines.append(f"  {plan.describe()}; BatchNorm batch {bn}")
        except BatchPlanError as err:
            lines.append(f"  {world_size} process(es): refused: {err}")
    source = recipe.source or "RECIPE.yaml"
    lines += ["launch lines:",
              f"  1 GPU:   powergrad train {source}",
              f"  4 GPUs:  powergrad torchrun --nproc_per_node 4 train {source}",
              f"  8 GPUs:  powergrad torchrun --nproc_per_node 8 train {source}",
              "  2 nodes: powergrad torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d "
              f"--rdzv_endpoint HOST:29500 train {source}  (on each node)",
              "  SLURM:   README, \"On a cluster\" (srun tasks or one torchrun per node)"]

    lr_at = lr_schedule(training)
    alpha = recipe.pgt.alpha if recipe.pgt.enabled else 1.0
    lines += ["", f"schedule {recipe.sched.sched}: {total_epochs} epochs to train "
              f"(train.epochs {recipe.train.epochs} + cool-down "
              f"{total_epochs - recipe.train.epochs}), {updates_per_epoch} steps per epoch "
              f"({images:,} images: {why}), lr updated every step; PGT alpha {alpha:g}"
              + ("" if recipe.pgt.enabled else " (PGT off)")]
    for epoch in key_epochs(recipe, total_epochs):
        lines.append(f"  lr at epoch {epoch:g}: {lr_at(epoch):.6g}")
    if recipe.paper:
        lines += ["", "paper: " + ", ".join(f"{k} {v}" for k, v in recipe.paper.items())]
    if png is not None:
        steps = total_epochs * updates_per_epoch  # about 2000 points draw any schedule
        positions = [step / updates_per_epoch
                     for step in range(0, steps, max(1, steps // 2000))]
        _plot_schedule(positions, [lr_at(p) for p in positions], alpha, recipe, png)
        lines.append(f"\nwrote {png}")
    return "\n".join(line for line in lines if line is not None)


def _plot_schedule(positions, lrs, alpha, recipe: Recipe, png: Path) -> None:
    from powergrad.report.plotting import pyplot

    plt = pyplot()
    fig, (ax_lr, ax_alpha) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    ax_lr.plot(positions, lrs)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title(Path(recipe.source).name or "recipe")
    ax_alpha.plot(positions, [alpha] * len(positions))
    ax_alpha.set_ylim(-0.05, 1.05)
    ax_alpha.set_ylabel("PGT alpha")
    ax_alpha.set_xlabel("epoch")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100, format="png")  # at exactly this path, whatever its suffix
    plt.close(fig)


def default_png(recipe: Recipe) -> Path:
    name = recipe.log.experiment or Path(recipe.source or "recipe").stem
    return Path(recipe.log.output) / "describe" / f"{name}_schedule.png"


def main(items: list[str], png: str | None) -> int:
    """`powergrad describe RECIPE [key=value ...] [--png FILE]`: 2 with one line when the
    items name no single recipe or the recipe is refused, else the plan printed, 0."""
    paths, overrides = split_items(items)
    if len(paths) != 1:
        print("powergrad describe: name exactly one recipe file", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(paths[0], overrides)
    except RecipeError as err:
        print(f"recipe error: {err}", file=sys.stderr)
        return 2
    print(describe(recipe, Path(png) if png else default_png(recipe)))
    return 0
