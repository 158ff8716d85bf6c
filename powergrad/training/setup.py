"""Everything a run trains with, built once: `build_training(recipe)`. The engine, gpu-check,
tools/gpu_saturation.py, tools/bench_engine.py and `describe` all build through it, so what
they time or show is what the engine trains.

Order matters for exact resumes and DDP: the seed, then the model (and its first weights),
then the data, then the optimizer, schedule and loss; the model is wrapped (torch.compile,
DDP) only after a checkpoint has been loaded into the bare model (`Training.wrap`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.utils import ModelEmaV3, random_seed

from powergrad.config.batching import BatchPlan, plan_batch
from powergrad.config.schema import Recipe
from powergrad.data import build_loaders
from powergrad.data.contract import EvalLoader, TrainLoader
from powergrad.system.distributed import (DistInfo, broadcast_from_main, init_distributed,
                                          process_device, world_from_env)
from powergrad.training.builders import (AMP_DTYPES, build_optimizer, build_scheduler,
                                         build_train_loss, pick_device)
from powergrad.training.clipping import clip_parameters
from powergrad.training.filters import FilterCollapse
from powergrad.training.finetune import load_initial_checkpoint
from powergrad.training.machine_fit import MachineFit, channels_last_hazard, fit_to_machine
from powergrad.training.models import build_model
from powergrad.training.sync_batchnorm import convert_to_sync_bn


@dataclass
class Training:
    """One run's parts. `model` is the bare module (checkpoints, EMA, evaluation);
    `train_model` is what the step calls: the same module, compiled and DDP-wrapped by wrap()."""
    recipe: Recipe
    device: torch.device
    dist_info: DistInfo
    plan: BatchPlan
    fit: MachineFit
    model: nn.Module
    amp_dtype: torch.dtype | None
    # what training adds (None, 0 or empty when built evaluation_only)
    optimizer: torch.optim.Optimizer | None
    scheduler: object
    total_epochs: int  # train.epochs + the schedule's cool-down
    updates_per_epoch: int
    mixup: Mixup | None
    loss_fn: nn.Module | None
    scaler: torch.amp.GradScaler | None
    ema: ModelEmaV3 | None
    clip_params: list
    filters: FilterCollapse | None = None  # log.filter_collapse
    probe: object = None  # gpas.ResidualStreamProbe on ViTs when diagnostics are on
    train_loader: TrainLoader | None = None  # None: built with_data=False
    eval_loader: EvalLoader | None = None
    notes: list[str] = field(default_factory=list)  # what set-up decided, for the log
    train_model: nn.Module | None = None

    def wrap(self) -> nn.Module:
        """The model as it trains: torch.compile'd when the recipe asks, under DDP when there
        are several processes."""
        model = self.model
        if self.recipe.train.torchcompile:
            model = torch.compile(model)
        if self.dist_info.enabled:
            # device_ids is the model's own device: under srun --gpus-per-task=1 every task's
            # GPU is cuda:0, whatever its local rank (distributed.process_device).
            ids = [self.device.index] if self.device.type == "cuda" else None
            # gradient_as_bucket_view: gradients live in DDP's buckets, no second copy
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                        gradient_as_bucket_view=True)
            if self.ema is not None:  # DDP just gave every rank rank 0's weights; so the EMA
                broadcast_from_main(self.ema.module.state_dict().values())
        self.train_model = model
        return model

    def model_to_train(self) -> nn.Module:
        """The wrapped model once wrap() ran, else the bare one (timing without DDP)."""
        return self.train_model if self.train_model is not None else self.model


def build_training(recipe: Recipe, *, with_data: bool = True, with_weights: bool = True,
                   updates_per_epoch: int | None = None,
                   device: torch.device | str | None = None, stop=None,
                   evaluation_only: bool = False) -> Training:
    """Build a run's parts from the recipe with timm's factories. with_data=False builds no
    loader (describe, timing on synthetic batches); updates_per_epoch then sets the schedule's
    length (default 1). with_weights=False leaves the seed's initial weights (no pretrained
    or initial checkpoint: describe, validate). device overrides train.device (tools that
    time on a chosen device). stop: the run's StopRequest, so a signal while the processes
    gather ends this one at once. evaluation_only: the device, processes, machine fit, model
    and loaders as training has them, without what only training needs (optimizer,
    schedule, loss, EMA, SyncBN): `powergrad validate` scores with these."""
    cfg = recipe.train
    device = pick_device(str(device) if device is not None else cfg.device)
    if device.type == "cuda" and device.index is None:
        device = process_device("cuda", world_from_env(), torch.cuda.device_count())
    dist_info = init_distributed(device, cfg.rendezvous_timeout, stop)
    if evaluation_only:  # evaluation batches: the training batch need not fit this launch
        plan = plan_batch(None, cfg.eval_batch_size, 1, dist_info.world_size)
    else:
        plan = plan_batch(cfg.global_batch, cfg.batch_size, cfg.grad_accum_steps,
                          dist_info.world_size)
    # cuDNN picks its fastest kernels per input shape once; the shapes repeat every step (a
    # resolution schedule adds a few), and tools/gpu_saturation.py times with the same choice.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    fit = fit_to_machine(recipe, device, plan.global_batch)  # what this machine changes
    notes = list(fit.notes)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random_seed(cfg.seed, dist_info.rank)

    model = build_model(recipe.model, pretrained=with_weights)  # model.pretrained decides
    if with_weights and recipe.model.initial_checkpoint:  # a resumed run's checkpoint wins later
        notes += load_initial_checkpoint(model, recipe.model)
    model = model.to(device)
    # one process: BatchNorm already sees the batch
    if cfg.sync_bn and dist_info.enabled and not evaluation_only:
        model = convert_to_sync_bn(model, device)
    # reference norms from the weights training starts from (the seed's, or the initial
    # checkpoint's), before a resumed run's checkpoint is loaded into the model
    filters = (FilterCollapse(model) if recipe.log.filter_collapse and not evaluation_only
               else None)
    channels_last = cfg.channels_last
    if (channels_last and not evaluation_only  # the hazard is in a backward pass
            and (hazard := channels_last_hazard(model, device)) is not None):
        fit.notes.append(hazard)  # recorded in final.json's ran_with, as the run trained
        notes.append(hazard)
        channels_last = False
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader = eval_loader = None
    if with_data:
        with warnings.catch_warnings():  # auto's choice is in fit.notes already
            warnings.filterwarnings("ignore", message="data.loader auto")
            train_loader, eval_loader = build_loaders(
                fit.data, batch_size=plan.micro_batch, eval_batch_size=cfg.eval_batch_size,
                seed=cfg.seed, device=device, dist_info=dist_info,
                channels_last=channels_last)
        updates_per_epoch = max(1, len(train_loader) // plan.accum_steps)
    amp_dtype = AMP_DTYPES[fit.amp_dtype]
    if evaluation_only:
        return Training(
            recipe=recipe, device=device, dist_info=dist_info, plan=plan, fit=fit, model=model,
            amp_dtype=amp_dtype, optimizer=None, scheduler=None, total_epochs=0,
            updates_per_epoch=0, mixup=None, loss_fn=None, scaler=None, ema=None,
            clip_params=[], train_loader=train_loader, eval_loader=eval_loader, notes=notes)
    updates_per_epoch = updates_per_epoch or 1
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    optimizer = build_optimizer(recipe, model)
    scheduler, total_epochs = build_scheduler(recipe, optimizer, updates_per_epoch)
    mixup, loss_fn = build_train_loss(recipe)
    probe = None
    if recipe.log.diagnostics and hasattr(model, "blocks"):  # a ViT: GPAS's per-block view
        from powergrad.gpas import ResidualStreamProbe
        probe = ResidualStreamProbe(model, enabled=False)
    return Training(
        recipe=recipe, device=device, dist_info=dist_info, plan=plan, fit=fit, model=model,
        optimizer=optimizer, scheduler=scheduler, total_epochs=total_epochs,
        updates_per_epoch=updates_per_epoch, mixup=mixup, loss_fn=loss_fn, amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16), ema=ema,
        clip_params=clip_parameters(model, recipe.clip.clip_mode, recipe.clip.exclude_head),
        filters=filters, probe=probe, train_loader=train_loader, eval_loader=eval_loader,
        notes=notes)
