"""The training loop. `train(recipe)` builds everything with timm's own factories, then trains
and evaluates epoch by epoch, writing TensorBoard events, summary.csv and atomic checkpoints.

Read top to bottom: set-up (device, model, data, optimizer, schedule, loss), resume, the epoch
loop (train_one_epoch, evaluate, log, checkpoint), and the final summary.
"""
from __future__ import annotations

import contextlib
import math
import signal
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.utils import ModelEmaV3, distribute_bn, random_seed, unwrap_model

from powergrad.config.batching import plan_batch
from powergrad.config.loading import load_recipe
from powergrad.config.schema import Recipe
from powergrad.data import build_loaders
from powergrad.system.distributed import (DistInfo, all_reduce_sum, barrier, cuda_index,
                                          gather_objects, init_distributed, world_from_env)
from powergrad.system.preemption import Preempted, StopRequest, exit_code_unsaved
from powergrad.system.progress import Progress
from powergrad.training import checkpoint as ckpt
from powergrad.training.builders import (AMP_DTYPES, build_optimizer, build_scheduler,
                                         build_train_loss, pick_device)
from powergrad.training.clipping import clip_gradients, clip_parameters
from powergrad.training.filters import FilterCollapse
from powergrad.training.finetune import load_initial_checkpoint
from powergrad.training.machine_fit import MachineFit, fit_to_machine
from powergrad.training.models import build_model
from powergrad.training.rundir import (RunDirError, RunLock, check_same_recipe, recipe_changes,
                                       run_dir_for)
from powergrad.training.runlog import EPOCH_TAGS, RESULT_FIELDS, RunLog, train_img_per_sec
from powergrad.training.sync_batchnorm import convert_to_sync_bn
from powergrad.transform import logit_stats

EVAL_TAGS = ("loss", "top1", "top5")  # logged as eval/<tag> (and eval_ema/<tag>)


@dataclass
class TrainState:
    """What a checkpoint must hold besides module states to continue exactly."""
    epoch: int = 0  # the next epoch to run
    num_updates: int = 0  # optimizer steps so far (the TensorBoard x axis)
    history: list = field(default_factory=list)  # one summary row per finished epoch
    # Set when preempted mid-epoch: micro-batches of `epoch` already trained, and the
    # epoch's running sums, so a resumed run replays the loader past them and goes on.
    batch_in_epoch: int = 0
    epoch_totals: dict = field(default_factory=dict)


class NonFiniteError(FloatingPointError):
    """The loss, the weights or the evaluation went non-finite; nothing of it was saved."""


def train(recipe: Recipe, run_dir: Path | None = None, fast_dev_run: int = 0,
          stop: StopRequest | None = None) -> dict:
    """Train `recipe` into run_dir (default: log.output/experiment) and return its summary.
    fast_dev_run=N instead trains N optimizer steps and evaluates N batches, writing nothing.

    stop: a StopRequest the caller entered before its own set-up (the CLI's, so a signal
    during preflight is not lost); by default one covering this call.

    Raises Preempted after saving on SIGTERM or SIGUSR1 (the CLI exits 75), RunDirError when
    the run directory is in use or holds another recipe's run, CheckpointError for a
    checkpoint that cannot be resumed, NonFiniteError when training diverges (nothing
    non-finite is saved)."""
    run_dir = Path(run_dir) if run_dir else run_dir_for(recipe)
    world = world_from_env()
    own_stop = stop is None
    stop = StopRequest() if own_stop else stop
    # The handlers go in first: a signal during set-up stops the run after its first
    # agreement step, with a checkpoint, instead of killing it unsaved.
    with stop if own_stop else contextlib.nullcontext():
        if fast_dev_run:
            return _train(recipe, run_dir, fast_dev_run, stop)
        check_same_recipe(run_dir, recipe)
        lock = RunLock(run_dir, recipe.log.lock_stale_after)  # one per run, held by rank 0
        with lock if world.is_main else contextlib.nullcontext():
            return _train(recipe, run_dir, fast_dev_run, stop)


def _train(recipe: Recipe, run_dir: Path, fast_dev_run: int, stop: StopRequest) -> dict:
    cfg = recipe.train
    device = pick_device(cfg.device)
    dist_info = init_distributed(device.type)
    plan = plan_batch(cfg.global_batch, cfg.batch_size, cfg.grad_accum_steps,
                      dist_info.world_size)
    if device.type == "cuda":
        device = torch.device("cuda", cuda_index(dist_info.local_rank, torch.cuda.device_count()))
    fit = fit_to_machine(recipe, device, plan.global_batch)  # what this machine changes
    say = print if dist_info.is_main else (lambda *args, **kwargs: None)
    for note in fit.notes:
        say(f"note: {note}", flush=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random_seed(cfg.seed, dist_info.rank)

    # --- model, data, optimizer, schedule, loss: all from timm's factories ---------------
    model = build_model(recipe.model, pretrained=True)  # cfg.pretrained decides
    if recipe.model.initial_checkpoint:  # fine-tuning: a resumed run's checkpoint wins later
        for note in load_initial_checkpoint(model, recipe.model):
            say(f"note: {note}", flush=True)
    model = model.to(device)
    if cfg.sync_bn and dist_info.enabled:  # one process: BatchNorm already sees the batch
        model = convert_to_sync_bn(model, device)
    # reference norms from the seed's initial weights (before any checkpoint is loaded)
    filters = FilterCollapse(model) if recipe.log.filter_collapse else None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    with warnings.catch_warnings():  # auto's choice is in fit.notes already
        warnings.filterwarnings("ignore", message="data.loader auto")
        train_loader, eval_loader = build_loaders(
            fit.data, batch_size=plan.micro_batch, eval_batch_size=cfg.eval_batch_size,
            seed=cfg.seed, device=device, dist_info=dist_info,
            channels_last=cfg.channels_last)
    _check_num_classes(recipe, train_loader)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    optimizer = build_optimizer(recipe, model)
    updates_per_epoch = max(1, len(train_loader) // plan.accum_steps)
    scheduler, total_epochs = build_scheduler(recipe, optimizer, updates_per_epoch)
    mixup, train_loss_fn = build_train_loss(recipe)
    amp_dtype = AMP_DTYPES[fit.amp_dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    state = TrainState()
    if not fast_dev_run:
        resume_from, payload, notes = ckpt.choose_resume(run_dir, recipe.log.resume)
        if dist_info.is_main:  # it holds the run's lock: no save of another process is live
            notes = ckpt.remove_temp_files(run_dir) + notes
        for note in notes:
            say(f"note: {note}", flush=True)
        if payload is not None:
            _check_checkpoint_recipe(resume_from, payload, recipe)
            state = _restore(payload, model, optimizer, scheduler, scaler, ema, dist_info)
            if state.epoch < total_epochs:
                say(f"resumed from {resume_from} at epoch {state.epoch + 1}, "
                    f"batch {state.batch_in_epoch}", flush=True)
        if state.epoch >= total_epochs:  # nothing to do, so nothing is written
            say(f"{run_dir}: already trained for {total_epochs} epochs; nothing written",
                flush=True)
            return _final_summary(recipe, state, run_dir, fit)

    train_model = model
    if cfg.torchcompile:
        train_model = torch.compile(train_model)
    if dist_info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)

    log = RunLog(run_dir, recipe, enabled=dist_info.is_main and not fast_dev_run,
                 ran_with=fit.record())
    probe = None
    if recipe.log.diagnostics and hasattr(model, "blocks"):  # a ViT: GPAS's per-block view
        from powergrad.gpas import ResidualStreamProbe
        probe = ResidualStreamProbe(model, enabled=False)
    saving = recipe.log.checkpoint and not fast_dev_run
    ctx = EpochContext(
        recipe=recipe, model=train_model, optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, loss_fn=train_loss_fn, mixup=mixup, ema=ema, device=device,
        amp_dtype=amp_dtype, dist_info=dist_info, log=log,
        clip_params=clip_parameters(model, recipe.clip.clip_mode, recipe.clip.exclude_head),
        probe=probe, filters=filters, accum_steps=plan.accum_steps, total_epochs=total_epochs,
        max_updates=fast_dev_run or None, save_checkpoints=saving,
        save_step=(lambda st: _save(ctx, st, run_dir, model, step=True))
        if saving and recipe.log.checkpoint_every else None)
    workers = f", {fit.data.workers} worker(s)" if fit.data.dataset == "imagefolder" else ""
    say(f"data: {fit.loader} loader{workers}; autocast {fit.amp_dtype}; device {device}",
        flush=True)
    say(f"batch: {plan.describe()}; lr {recipe.optim.lr:g} at its peak; {total_epochs} epochs"
        f"{_cooldown_words(recipe, total_epochs)} ({updates_per_epoch} steps each)", flush=True)
    if fast_dev_run:  # one short epoch: a broken data path shows in a minute
        total_epochs = min(total_epochs, state.epoch + 1)

    # --- the epoch loop --------------------------------------------------------------------
    for epoch in range(state.epoch, total_epochs):
        try:
            _run_epoch(ctx, train_loader, eval_loader, epoch, state, stop, run_dir, model)
            if epoch + 1 < total_epochs and stop.agreed(device):  # signalled in evaluation
                raise Preempted
        except Preempted:
            raise _preempted(ctx, state, run_dir, model, stop) from None
        except NonFiniteError as err:
            log.scalars({"numerics/non_finite_stop": 1.0}, state.num_updates)
            log.close()
            good = ckpt.training_checkpoints(run_dir) if saving else []
            raise NonFiniteError(f"{err}; stopped, nothing of it saved; last good "
                                 f"checkpoint: {good[0] if good else 'none'}") from None

    summary = _final_summary(recipe, state, run_dir, fit)
    if fast_dev_run:
        summary["eval_batches"] = min(fast_dev_run, len(eval_loader))
    log.hparams(recipe, {"final_top1": summary["final_test_top1"],
                         "best_top1": summary["best_test_top1"]})
    log.final(summary)
    log.close()
    return summary


def _preempted(ctx: EpochContext, state: TrainState, run_dir: Path, model: nn.Module,
               stop: StopRequest) -> Preempted:
    """Save the place (when checkpoints are on) and say what the next command will do."""
    where = f"epoch {state.epoch + 1}, batch {state.batch_in_epoch}"
    if ctx.save_checkpoints:
        _save(ctx, state, run_dir, model)
    barrier()
    ctx.log.close()
    if ctx.save_checkpoints:
        return Preempted(f"preempted: saved {run_dir / 'last.pth'} at {where}; run the same "
                         "command to resume")
    why = "--fast-dev-run" if ctx.max_updates is not None else "log.checkpoint is false"
    code = exit_code_unsaved(stop.signum or signal.SIGTERM)
    return Preempted(f"preempted at {where}: nothing saved ({why}), so this run cannot "
                     f"resume; exit code {code}", code)


def _run_epoch(ctx: EpochContext, train_loader, eval_loader, epoch: int, state: TrainState,
               stop: StopRequest, run_dir: Path, model: nn.Module) -> None:
    """Train one epoch, evaluate (the unwrapped model, and its EMA), log, checkpoint."""
    recipe, cfg, dist_info, log = ctx.recipe, ctx.recipe.train, ctx.dist_info, ctx.log
    device, amp_dtype, optimizer, ema = ctx.device, ctx.amp_dtype, ctx.optimizer, ctx.ema
    train_loader.set_epoch(epoch)
    bad_before = _bad_images_seen(train_loader, eval_loader)
    train_stats = train_one_epoch(ctx, train_loader, epoch, state, stop)
    if dist_info.enabled:  # average BN running statistics so every rank evaluates one model
        distribute_bn(model, dist_info.world_size, reduce=True)
    eval_stats = evaluate(model, eval_loader, device, amp_dtype, cfg.tta_flip,
                          max_batches=ctx.max_updates)
    if not math.isfinite(eval_stats["loss"]) and ctx.max_updates is not None:
        # A fast dev run evaluates after a few steps, when BatchNorm's running statistics
        # have barely moved from their start and deep nets without zero-initialised blocks
        # can overflow: that is not divergence, and nothing is saved anyway.
        print(f"note: test loss {eval_stats['loss']} after {state.num_updates} step(s): "
              "BatchNorm running statistics are still near their start", flush=True)
    elif not math.isfinite(eval_stats["loss"]):
        raise NonFiniteError(f"the evaluation after epoch {epoch + 1}/{ctx.total_epochs} gave "
                             f"test loss {eval_stats['loss']}: the weights diverged in the "
                             f"epoch's last steps (optimizer step {state.num_updates})")
    log.scalars({f"eval/{k}": eval_stats[k] for k in EVAL_TAGS}, state.num_updates)
    bad_images = int(all_reduce_sum(
        [float(_bad_images_seen(train_loader, eval_loader) - bad_before)], device)[0])
    if ema is not None:
        ema_stats = evaluate(ema.module, eval_loader, device, amp_dtype, cfg.tta_flip,
                             max_batches=ctx.max_updates)
        log.scalars({f"eval_ema/{k}": ema_stats[k] for k in EVAL_TAGS}, state.num_updates)
    row = {"epoch": epoch, "train_loss": train_stats["loss"], "train_top1": train_stats["top1"],
           "eval_loss": eval_stats["loss"], "eval_top1": eval_stats["top1"],
           "eval_top5": eval_stats["top5"], "lr": optimizer.param_groups[0]["lr"],
           "img_per_sec": train_stats["img_per_sec"], "train_images": train_stats["images"],
           "data_wait_frac": train_stats["data_wait_frac"],
           "epoch_seconds": train_stats["seconds"], "bad_images": bad_images}
    log.scalars({**{tag: row[column] for column, tag in EPOCH_TAGS.items()},
                 "epoch/number": epoch + 1, "data/bad_images": bad_images}, state.num_updates)
    state.history.append(row)
    log.write_summary(state.history)
    if dist_info.is_main:
        print(f"epoch {epoch + 1}/{ctx.total_epochs}: train loss {row['train_loss']:.4f} "
              f"top1 {row['train_top1']:.2f} | test loss {row['eval_loss']:.4f} "
              f"top1 {row['eval_top1']:.2f} top5 {row['eval_top5']:.2f} | "
              f"{row['img_per_sec']:.0f} img/s"
              + (f" | {bad_images} unreadable image(s) skipped" if bad_images else ""),
              flush=True)
    state.epoch = epoch + 1
    if ctx.save_checkpoints:
        _save(ctx, state, run_dir, model, is_best=_best_row(state.history) is row)
    barrier()


@dataclass
class EpochContext:
    recipe: Recipe
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    device: torch.device
    amp_dtype: torch.dtype | None
    dist_info: DistInfo
    log: RunLog
    clip_params: list
    probe: object = None  # gpas.ResidualStreamProbe on ViTs when diagnostics are on
    filters: FilterCollapse | None = None  # log.filter_collapse
    accum_steps: int = 1  # micro-batches per optimizer step (batching.plan_batch)
    total_epochs: int = 1  # epochs + the schedule's cool-down
    max_updates: int | None = None  # fast_dev_run: stop the epoch after this many steps
    save_checkpoints: bool = True
    save_step: Callable[[TrainState], None] | None = None  # step-N.pth every checkpoint_every


def train_one_epoch(ctx: EpochContext, loader, epoch: int, state: TrainState,
                    stop: StopRequest | None = None) -> dict:
    recipe, model, optimizer = ctx.recipe, ctx.model, ctx.optimizer
    accum = ctx.accum_steps
    log_every = recipe.log.log_interval
    model.train()
    skip = state.batch_in_epoch  # > 0 when resuming a preempted epoch
    totals = dict(state.epoch_totals) or dict(loss=0.0, correct=0.0, seen=0, wait=0.0)
    seen_before = totals["seen"]  # samples of this epoch trained before a preemption
    window = dict(loss=0.0, correct=0.0, seen=0, start=time.perf_counter(), wait=0.0)
    pending = _zero_pending(ctx.device)
    progress = Progress(len(loader) - skip, f"epoch {epoch + 1}/{ctx.total_epochs}",
                        enabled=ctx.dist_info.is_main, every=log_every)
    epoch_start = tick = time.perf_counter()
    last_micro_step = (len(loader) // accum) * accum - 1
    if ctx.max_updates is not None:
        last_micro_step = min(last_micro_step, ctx.max_updates * accum - 1)
    micro_step = skip - 1
    for micro_step, (images, labels) in enumerate(loader):
        if micro_step > last_micro_step:
            break  # a partial accumulation group at the end of the epoch is dropped
        if micro_step < skip:
            continue  # replayed, not trained: the loader's order and augmentation stay in step
        data_wait = time.perf_counter() - tick
        if getattr(loader, "batch_augment", None) is not None:  # random erasing (timm's order)
            images = loader.batch_augment(images)
        targets = labels
        if ctx.mixup is not None:
            images, targets = ctx.mixup(images, labels)
        is_update = (micro_step + 1) % accum == 0
        measure = (is_update and recipe.log.diagnostics
                   and (state.num_updates + 1) % log_every == 0)
        if ctx.probe is not None:
            ctx.probe.enabled = measure  # record the residual stream of this forward only
        sync = contextlib.nullcontext() if is_update or not ctx.dist_info.enabled else model.no_sync()
        with sync:
            with _autocast(ctx.device, ctx.amp_dtype):
                logits = model(images)
                loss = ctx.loss_fn(logits, targets)
            ctx.scaler.scale(loss / accum).backward()

        # Sums stay on the device between log steps: no host sync on every step (GPU).
        pending["loss"] += loss.detach().double() * labels.shape[0]  # exact sums: resume-safe
        pending["correct"] += (logits.detach().argmax(-1) == labels).sum()  # unmixed labels
        pending["seen"] += labels.shape[0]
        pending["wait"] += data_wait

        if is_update:
            ctx.scaler.unscale_(optimizer)
            diagnostics = ctx.probe.stats() if measure and ctx.probe is not None else {}
            diagnostics.update(clip_gradients(ctx.clip_params, recipe.clip.clip_mode,
                                              recipe.clip.clip_grad, measure=measure))
            ctx.scaler.step(optimizer)
            ctx.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.num_updates += 1
            if ctx.ema is not None:
                ctx.ema.update(unwrap_model(model), step=state.num_updates)
            ctx.scheduler.step_update(num_updates=state.num_updates)
            where = (f"epoch {epoch + 1}/{ctx.total_epochs}, batch {micro_step + 1}/"
                     f"{len(loader)} (optimizer step {state.num_updates})")
            if state.num_updates % log_every == 0:
                _fold_pending(pending, (totals, window), where)
                scalars = _window_scalars(window, optimizer, ctx.dist_info.world_size)
                if measure:
                    scalars.update(diagnostics)
                    stats = logit_stats(logits, recipe.pgt.alpha if recipe.pgt.enabled else 1.0)
                    scalars.update({f"pgt/{k}": v for k, v in stats.items()})
                if ctx.filters is not None:
                    scalars.update(ctx.filters.counts())
                ctx.log.scalars(scalars, state.num_updates)
                window.update(loss=0.0, correct=0.0, seen=0, start=time.perf_counter(), wait=0.0)
            if stop is not None and stop.should_stop(state.num_updates, ctx.device):
                _fold_pending(pending, (totals, window), where)
                state.batch_in_epoch, state.epoch_totals = micro_step + 1, dict(totals)
                progress.close()
                raise Preempted
            if (ctx.save_step is not None and micro_step < last_micro_step
                    and state.num_updates % recipe.log.checkpoint_every == 0):
                _fold_pending(pending, (totals, window), where)  # a kill loses at most N steps
                state.batch_in_epoch, state.epoch_totals = micro_step + 1, dict(totals)
                ctx.save_step(state)
                state.batch_in_epoch, state.epoch_totals = 0, {}
        if micro_step == last_micro_step:  # the epoch's last progress line shows all of it
            _fold_pending(pending, (totals, window), where)
        progress.update(_running_means(totals))
        tick = time.perf_counter()
    _fold_pending(pending, (totals, window),
                  f"epoch {epoch + 1}/{ctx.total_epochs}, end (optimizer step {state.num_updates})")
    state.batch_in_epoch, state.epoch_totals = 0, {}
    if ctx.probe is not None:
        ctx.probe.enabled = False  # keep evaluation forwards out of the record

    seconds = time.perf_counter() - epoch_start
    loss_sum, correct, seen, seen_now = all_reduce_sum(
        [totals["loss"], totals["correct"], float(totals["seen"]),
         float(totals["seen"] - seen_before)], ctx.device)
    means = {"loss": loss_sum / max(seen, 1), "top1": 100 * correct / max(seen, 1)}
    # the bar's last line shows every process's images, as the epoch line does
    progress.close({"loss": f"{means['loss']:.4f}", "top1": f"{means['top1']:.2f}"})
    return {**means, "img_per_sec": seen_now / seconds, "data_wait_frac": totals["wait"] / seconds,
            "seconds": seconds, "images": int(seen_now)}


def _running_means(totals: dict) -> dict[str, str]:
    """Loss and top-1 so far for the progress line; '-' until the first log step has folded
    the device-side sums in (never a made-up 0)."""
    if not totals["seen"]:
        return {"loss": "-", "top1": "-"}
    return {"loss": f"{totals['loss'] / totals['seen']:.3f}",
            "top1": f"{100 * totals['correct'] / totals['seen']:.1f}"}


def _zero_pending(device) -> dict:
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return dict(loss=zero.clone(), correct=zero.clone(), seen=0, wait=0.0)


def _fold_pending(pending: dict, sums: tuple[dict, ...], where: str) -> None:
    """Move the device-side sums into the host-side running sums (one sync), then reset;
    a non-finite loss since the last fold stops the run here, before anything is saved."""
    if pending["seen"] == 0:
        return
    loss_sum, correct = torch.stack([pending["loss"], pending["correct"].double()]).tolist()
    if not math.isfinite(loss_sum):
        raise NonFiniteError(f"training loss {loss_sum} by {where}")
    for acc in sums:
        acc["loss"] += loss_sum
        acc["correct"] += correct
        acc["seen"] += pending["seen"]
        acc["wait"] += pending["wait"]
    pending.update(_zero_pending(pending["loss"].device))


def _window_scalars(window: dict, optimizer, world_size: int) -> dict[str, float]:
    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    seen = max(window["seen"], 1)
    return {"train/loss": window["loss"] / seen, "train/top1": 100 * window["correct"] / seen,
            "train/lr": optimizer.param_groups[0]["lr"],
            "perf/img_per_sec": window["seen"] * world_size / elapsed,
            "perf/data_wait_frac": window["wait"] / elapsed}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype, tta_flip: bool = False,
             max_batches: int | None = None) -> dict:
    """Test loss, top-1 and top-5 (%) and the images scored, summed over ranks; with tta_flip
    the logits of each image and its mirror image are averaged. max_batches: only the first
    batches (dev runs)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1, top-5 hits
    seen = 0
    for batch_index, (images, labels) in enumerate(loader):
        if max_batches is not None and batch_index >= max_batches:
            break
        with _autocast(device, amp_dtype):
            logits = model(images)
            if tta_flip:
                logits = (logits + model(images.flip(-1))) / 2
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=-1).sum().double()])
        seen += labels.shape[0]
    loss_sum, top1, top5, seen = all_reduce_sum([*sums.tolist(), float(seen)], device)
    return {"loss": loss_sum / seen, "top1": 100 * top1 / seen, "top5": 100 * top5 / seen,
            "images": int(seen)}


# --- set-up helpers ------------------------------------------------------------------------

def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _check_num_classes(recipe: Recipe, loader) -> None:
    if loader.num_classes != recipe.model.num_classes:
        raise ValueError(f"{recipe.source}: model.num_classes is {recipe.model.num_classes} but "
                         f"the data has {loader.num_classes} classes")


# --- checkpoints ---------------------------------------------------------------------------

def _save(ctx: EpochContext, state: TrainState, run_dir: Path, model: nn.Module, *,
          is_best: bool = False, step: bool = False) -> None:
    """last.pth (or step-N.pth), and best.pth (weights only) for the best epoch. Every rank
    takes part: each contributes its own RNG state and running sums."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise NonFiniteError(f"non-finite weights at optimizer step {state.num_updates}")
    rank_states = gather_objects({"rng": ckpt.rng_state(), "epoch_totals": dict(state.epoch_totals)})
    if not ctx.dist_info.is_main:
        return
    payload = ckpt.training_payload(
        model_state=unwrap_model(model).state_dict(), optimizer=ctx.optimizer,
        scheduler=ctx.scheduler, scaler=ctx.scaler,
        ema_state=ctx.ema.module.state_dict() if ctx.ema is not None else None,
        state=asdict(state), rank_states=rank_states, recipe=ctx.recipe)
    if step:
        ckpt.save_step_checkpoint(payload, run_dir, state.num_updates,
                                  ctx.recipe.log.keep_checkpoints)
        return
    ckpt.save_atomic(payload, run_dir / "last.pth")
    if is_best:
        ckpt.save_atomic(ckpt.weights_payload(payload), run_dir / "best.pth")


def _check_checkpoint_recipe(path: Path, payload: dict, recipe: Recipe) -> None:
    if payload["recipe_digest"] == recipe.digest():
        return
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "recipe.yaml"
        saved.write_text(payload["recipe_yaml"])
        changes = recipe_changes(load_recipe(saved), recipe)
    raise RunDirError(f"{path} was trained with other settings: {'; '.join(changes)}. Undo "
                      "the change to continue it, or start a new run (log.experiment=NAME).")


def _restore(payload: dict, model, optimizer, scheduler, scaler, ema,
             dist_info: DistInfo) -> TrainState:
    known = TrainState.__dataclass_fields__
    state = TrainState(**{k: v for k, v in payload["state"].items() if k in known})
    rank_states = payload["rank_states"]
    if state.batch_in_epoch and len(rank_states) != dist_info.world_size:
        raise ckpt.CheckpointError(
            f"the checkpoint was saved inside epoch {state.epoch + 1} by {len(rank_states)} "
            f"process(es); resume it with the same number (this launch has "
            f"{dist_info.world_size}) or from an end-of-epoch checkpoint")
    unwrap_model(model).load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    if ema is not None and payload["ema"] is not None:
        ema.module.load_state_dict(payload["ema"])
    mine = rank_states[dist_info.rank % len(rank_states)]
    ckpt.restore_rng_state(mine["rng"])
    state.epoch_totals = dict(mine["epoch_totals"])
    scheduler.step_update(num_updates=state.num_updates)
    return state


def _bad_images_seen(*loaders) -> int:
    """Unreadable images the loaders skipped so far (data.bad_images: skip), this process."""
    return sum(loader.bad_images.count for loader in loaders if hasattr(loader, "bad_images"))


def _best_row(history: list[dict]) -> dict | None:
    """The epoch with the highest test top-1 (the earliest on a tie)."""
    return max(history, key=lambda r: r["eval_top1"], default=None)


def _cooldown_words(recipe: Recipe, total_epochs: int) -> str:
    """' (train.epochs 90 + 10 cool-down)' when the schedule trains more than train.epochs."""
    extra = total_epochs - recipe.train.epochs
    return f" (train.epochs {recipe.train.epochs} + {extra} cool-down)" if extra > 0 else ""


def _final_summary(recipe: Recipe, state: TrainState, run_dir: Path, fit: MachineFit) -> dict:
    history = state.history
    rows = {"last": history[-1] if history else {}, "best": _best_row(history) or {}}
    return {
        "run_dir": str(run_dir), "recipe": recipe.source, "digest": recipe.digest(),
        "epochs": state.epoch, "updates": state.num_updates,
        **{name: rows[which].get(column, float("nan"))
           for name, (column, _, which) in RESULT_FIELDS.items()},
        "best_epoch": rows["best"].get("epoch", -1) + 1,
        "img_per_sec": train_img_per_sec(history),  # its definition: runlog.py
        "train_seconds": sum(r["epoch_seconds"] for r in history),
        "bad_images_skipped": sum(r.get("bad_images", 0) for r in history),
        "ran_with": fit.record(),
        "paper": recipe.paper,
    }
