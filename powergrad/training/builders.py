"""Recipe sections turned into training objects with timm's own factories: the device, the
optimizer, the learning-rate schedule (and the epoch count it implies) and the training loss.
The engine trains with them; `powergrad describe` shows them without loading any data."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from powergrad.config.schema import Recipe
from powergrad.system.gpus import GpuUnusable, refuse_unusable_gpu
from powergrad.transform import wrap_loss

AMP_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """auto: CUDA where torch can use this machine's GPU, the CPU where it has none. A GPU that
    torch cannot use (a driver older than its CUDA, no kernels for the GPU) is refused with one
    line (GpuUnusable) for auto and cuda alike, never trained on the CPU unasked; cpu is the
    way to do that on purpose, and probes nothing."""
    if name == "cpu":
        return torch.device("cpu")
    refuse_unusable_gpu()
    cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "cpu")
    if not cuda:
        raise GpuUnusable(f"train.device is {name}, but torch sees no CUDA device (no NVIDIA "
                          "GPU here, or CUDA_VISIBLE_DEVICES hides them); use train.device=auto "
                          "or cpu")
    return torch.device(name)


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    optim_cfg = recipe.optim
    extra = {}
    if optim_cfg.opt_eps is not None:
        extra["eps"] = optim_cfg.opt_eps
    if optim_cfg.opt_betas is not None:
        extra["betas"] = tuple(optim_cfg.opt_betas)
    return create_optimizer_v2(model, opt=optim_cfg.opt, lr=optim_cfg.lr,
                               weight_decay=optim_cfg.weight_decay,
                               momentum=optim_cfg.momentum,
                               filter_bias_and_bn=optim_cfg.filter_bias_and_bn, **extra)


def build_scheduler(recipe: Recipe, optimizer, updates_per_epoch: int):
    """(scheduler, epochs to train). timm's factory adds the cool-down to the epoch count of
    the cycle-based schedules (cosine, tanh, poly, wsd) and not to step/multistep; the loop
    must run the count it returns, or the cool-down never happens."""
    sched_cfg = recipe.sched
    if sched_cfg.sched == "none":
        return ConstantSchedule(), recipe.train.epochs
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=sched_cfg.sched, num_epochs=recipe.train.epochs,
        decay_epochs=sched_cfg.decay_epochs, decay_milestones=sched_cfg.decay_milestones,
        cooldown_epochs=sched_cfg.cooldown_epochs, decay_rate=sched_cfg.decay_rate,
        min_lr=sched_cfg.min_lr, warmup_lr=sched_cfg.warmup_lr,
        warmup_epochs=sched_cfg.warmup_epochs,
        decay_fn=sched_cfg.decay_fn if sched_cfg.sched == "wsd" else None,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    scheduler.step_update(num_updates=0)  # the warm-up learning rate from the first step
    return scheduler, int(num_epochs)


class ConstantSchedule:
    """`sched: none`: the optimizer's lr throughout."""

    def step_update(self, num_updates: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_train_loss(recipe: Recipe):
    """(mixup or None, loss): timm's train.py choice of loss, then the PGT wrap, the two
    lines a timm user adds."""
    loss_cfg, num_classes = recipe.loss, recipe.model.num_classes
    mixup = None
    if loss_cfg.mixup > 0 or loss_cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=loss_cfg.mixup, cutmix_alpha=loss_cfg.cutmix,
                      prob=loss_cfg.mixup_prob, switch_prob=loss_cfg.mixup_switch_prob,
                      mode=loss_cfg.mixup_mode, label_smoothing=loss_cfg.smoothing,
                      num_classes=num_classes)
        loss_fn = SoftTargetCrossEntropy()
    elif loss_cfg.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=loss_cfg.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
    if recipe.pgt.enabled:
        loss_fn = wrap_loss(loss_fn, recipe.pgt.alpha, recipe.pgt.emulate_fork_fp16)
    return mixup, loss_fn
