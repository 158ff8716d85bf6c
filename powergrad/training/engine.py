"""The training loop. `train(recipe)` builds the run (setup.build_training), resumes it, then
trains and evaluates epoch by epoch (step.train_one_epoch), writing TensorBoard events,
summary.csv and atomic checkpoints, and returns the final summary.

Read top to bottom: train (the run folder's lock), _train (set-up, resume, the epoch loop,
the summary), run_epoch (train, evaluate, log, checkpoint).
"""
from __future__ import annotations

import contextlib
import math
import signal
from pathlib import Path

import torch
from timm.utils import distribute_bn

from powergrad.config.schema import Recipe
from powergrad.system.distributed import (StoppedWhileGathering, all_reduce_sum, barrier,
                                          world_from_env)
from powergrad.system.preemption import Preempted, StopRequest, exit_code_unsaved
from powergrad.training import checkpoint as ckpt
from powergrad.training.evaluate import EVAL_TAGS, evaluate
from powergrad.training.resume import check_checkpoint_recipe, restore, save
from powergrad.training.rundir import RunLock, check_same_recipe, run_dir_for
from powergrad.training.runlog import EPOCH_TAGS, RESULT_FIELDS, RunLog, train_img_per_sec
from powergrad.training.setup import Training, build_training
from powergrad.training.step import NonFiniteError, TrainState, train_one_epoch


def train(recipe: Recipe, run_dir: Path | None = None, *, max_steps: int | None = None,
          stop: StopRequest | None = None) -> dict:
    """Train `recipe` into run_dir (default: log.output/experiment) and return its summary.

    max_steps: a fast dev run: one epoch of at most max_steps optimizer steps, evaluated on as
    many batches, reading and writing no run folder. stop: the command's StopRequest (entered
    before its set-up, so a signal during preflight is not lost); None: signals are not
    this function's to handle.

    Raises Preempted after saving when `stop` is requested (the CLI exits 75; before the
    first step it ends at once, see _stopped_in_setup), RunDirError when the run directory
    is in use or holds another recipe's run, CheckpointError for a checkpoint that cannot be
    resumed, NonFiniteError when training diverges (nothing non-finite is saved)."""
    threads = torch.get_num_threads()  # train.threads sets the process's count: put it back
    try:
        if max_steps is not None:
            return _train(recipe, None, max_steps, stop)
        run_dir = Path(run_dir) if run_dir else run_dir_for(recipe)
        check_same_recipe(run_dir, recipe)
        lock = RunLock(run_dir, recipe.log.lock_stale_after)  # one per run, held by rank 0
        with lock if world_from_env().is_main else contextlib.nullcontext():
            return _train(recipe, run_dir, None, stop)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe, run_dir: Path | None, max_steps: int | None,
           stop: StopRequest | None) -> dict:
    """run_dir None: a fast dev run, which resumes, logs and saves nothing."""
    stop = stop or StopRequest(world_size=1)  # never requested: no handler is installed
    saving = run_dir is not None and recipe.log.checkpoint
    save_dir = run_dir if saving else None
    try:
        t = build_training(recipe, stop=stop)
    except StoppedWhileGathering:
        raise _stopped_in_setup(save_dir, stop) from None
    say = print if t.dist_info.is_main else (lambda *args, **kwargs: None)
    for note in t.notes:
        say(f"note: {note}", flush=True)
    state, total_epochs = TrainState(), t.total_epochs
    if run_dir is not None:
        state = _resume(t, run_dir, say)
        if state.epoch >= total_epochs:  # nothing to do, so nothing is written
            say(f"{run_dir}: already trained for {total_epochs} epochs; nothing written",
                flush=True)
            return _final_summary(recipe, state, run_dir, t.fit)
    if stop.agreed(t.device):  # signalled while loading: nothing of this attempt to save
        raise _stopped_in_setup(save_dir, stop)
    t.wrap()
    log = RunLog(run_dir or Path(), recipe, ran_with=t.fit.record(),
                 enabled=t.dist_info.is_main and run_dir is not None)
    workers = f", {t.fit.data.workers} worker(s)" if t.fit.data.dataset == "imagefolder" else ""
    say(f"data: {t.fit.loader} loader{workers}; autocast {t.fit.amp_dtype}; device {t.device}",
        flush=True)
    say(f"batch: {t.plan.describe()}; lr {recipe.optim.lr:g} at its peak; {total_epochs} epochs"
        f"{_cooldown_words(recipe, total_epochs)} ({t.updates_per_epoch} steps each)", flush=True)
    if max_steps is not None:  # one short epoch: a broken data path shows in a minute
        total_epochs = 1

    for epoch in range(state.epoch, total_epochs):
        try:
            run_epoch(t, epoch, state, log, stop=stop, max_steps=max_steps, save_dir=save_dir)
        except Preempted:
            raise _preempted(t, log, state, save_dir, stop, max_steps) from None
        except NonFiniteError as err:
            log.scalars({"numerics/non_finite_stop": 1.0}, state.num_updates)
            log.close()
            good = ckpt.training_checkpoints(save_dir) if save_dir else []
            raise NonFiniteError(f"{err}; stopped, nothing of it saved; last good "
                                 f"checkpoint: {good[0] if good else 'none'}") from None
        # signalled in the epoch's save (in its evaluation, evaluate raised already): that
        # checkpoint holds this place, so it is not written twice; after the last epoch's
        # save the run has finished and ends as finished
        if epoch + 1 < total_epochs and stop.agreed(t.device):
            raise _preempted(t, log, state, save_dir, stop, max_steps, saved=True)

    summary = _final_summary(recipe, state, run_dir or run_dir_for(recipe), t.fit)
    if max_steps is not None:
        summary["eval_batches"] = min(max_steps, len(t.eval_loader))
    log.hparams(recipe, {"final_top1": summary["final_test_top1"],
                         "best_top1": summary["best_test_top1"]})
    log.final(summary)
    log.close()
    return summary


def _resume(t: Training, run_dir: Path, say) -> TrainState:
    """The state to continue from: the run folder's newest readable checkpoint (or
    log.resume's), loaded into the bare model and the run's parts; a fresh state if none."""
    resume_from, payload, notes = ckpt.choose_resume(run_dir, t.recipe.log.resume)
    if t.dist_info.is_main:  # it holds the run's lock: no save of another process is live
        notes = ckpt.remove_temp_files(run_dir) + notes
    for note in notes:
        say(f"note: {note}", flush=True)
    if payload is None:
        return TrainState()
    check_checkpoint_recipe(resume_from, payload, t.recipe)
    state, restore_notes = restore(payload, t)
    for note in restore_notes:  # what this machine could not take over
        say(f"note: {note}", flush=True)
    if state.epoch < t.total_epochs:
        say(f"resumed from {resume_from} at {_place(t, state)}", flush=True)
    return state


def run_epoch(t: Training, epoch: int, state: TrainState, log: RunLog, *,
              stop: StopRequest, max_steps: int | None, save_dir: Path | None) -> None:
    """Train one epoch, evaluate (the bare model, and its EMA), log, checkpoint (into
    save_dir, when given)."""
    cfg = t.recipe.train
    t.train_loader.set_epoch(epoch)
    bad_before = t.train_loader.skipped_images + t.eval_loader.skipped_images
    save_step = None
    if save_dir is not None and t.recipe.log.checkpoint_every:
        save_step = lambda st: save(t, st, save_dir, step=True)  # noqa: E731
    train_stats = train_one_epoch(t, epoch, state, log, stop=stop, save_step=save_step,
                                  max_steps=max_steps)
    if t.dist_info.enabled:  # average BN running statistics so every rank evaluates one model
        distribute_bn(t.model, t.dist_info.world_size, reduce=True)
    # Both evaluations before anything is logged: a stop in either (Preempted) leaves the
    # epoch unlogged, and the resumed run evaluates it and logs it once.
    eval_stats = evaluate(t.model, t.eval_loader, t.device, t.amp_dtype, cfg.tta_flip,
                          max_batches=max_steps, stop=stop)
    if not math.isfinite(eval_stats["loss"]) and max_steps is not None:
        # A fast dev run evaluates after a few steps, when BatchNorm's running statistics
        # have barely moved from their start and deep nets without zero-initialised blocks
        # can overflow: that is not divergence, and nothing is saved anyway.
        print(f"note: test loss {eval_stats['loss']} after {state.num_updates} step(s): "
              "BatchNorm running statistics are still near their start", flush=True)
    elif not math.isfinite(eval_stats["loss"]):
        raise NonFiniteError(f"the evaluation after epoch {epoch + 1}/{t.total_epochs} gave "
                             f"test loss {eval_stats['loss']}: the weights diverged in the "
                             f"epoch's last steps (optimizer step {state.num_updates})")
    bad_images = int(all_reduce_sum(  # before the EMA's pass skips the same images again
        [float(t.train_loader.skipped_images + t.eval_loader.skipped_images - bad_before)],
        t.device)[0])
    ema_stats = None if t.ema is None else evaluate(
        t.ema.module, t.eval_loader, t.device, t.amp_dtype, cfg.tta_flip,
        max_batches=max_steps, stop=stop)
    log.scalars({f"eval/{k}": eval_stats[k] for k in EVAL_TAGS}, state.num_updates)
    if ema_stats is not None:
        log.scalars({f"eval_ema/{k}": ema_stats[k] for k in EVAL_TAGS}, state.num_updates)
    row = {"epoch": epoch, "train_loss": train_stats["loss"], "train_top1": train_stats["top1"],
           "eval_loss": eval_stats["loss"], "eval_top1": eval_stats["top1"],
           "eval_top5": eval_stats["top5"], "lr": t.optimizer.param_groups[0]["lr"],
           "img_per_sec": train_stats["img_per_sec"], "train_images": train_stats["images"],
           "data_wait_frac": train_stats["data_wait_frac"],
           "epoch_seconds": train_stats["seconds"], "bad_images": bad_images}
    log.scalars({**{tag: row[column] for column, tag in EPOCH_TAGS.items()},
                 "epoch/number": epoch + 1, "data/bad_images": bad_images}, state.num_updates)
    state.history.append(row)
    log.write_summary(state.history)
    if t.dist_info.is_main:
        print(f"epoch {epoch + 1}/{t.total_epochs}: train loss {row['train_loss']:.4f} "
              f"top1 {row['train_top1']:.2f} | test loss {row['eval_loss']:.4f} "
              f"top1 {row['eval_top1']:.2f} top5 {row['eval_top5']:.2f} | "
              + (f"{row['img_per_sec']:.0f} img/s" if math.isfinite(row['img_per_sec'])
                 else "- img/s (trained before the requeue)")
              + (f" | {bad_images} unreadable image(s) skipped" if bad_images else ""),
              flush=True)
    state.epoch, state.batch_in_epoch, state.epoch_totals = epoch + 1, 0, {}
    if save_dir is not None:
        save(t, state, save_dir, is_best=_best_row(state.history) is row)
    barrier()


def _preempted(t: Training, log: RunLog, state: TrainState, save_dir: Path | None,
               stop: StopRequest, max_steps: int | None, saved: bool = False) -> Preempted:
    """Save the place (when checkpoints are on and `saved` says last.pth does not hold it
    yet) and say what the next command will do."""
    where = _place(t, state)
    if save_dir is not None and not saved:
        save(t, state, save_dir)
    barrier()
    log.close()
    if save_dir is not None:
        return Preempted(f"preempted: saved {save_dir / 'last.pth'} at {where}; run the same "
                         "command to resume")
    why = "--fast-dev-run" if max_steps is not None else "log.checkpoint is false"
    code = exit_code_unsaved(stop.signum or signal.SIGTERM)
    return Preempted(f"preempted at {where}: nothing saved ({why}), so this run cannot "
                     f"resume; exit code {code}", code)


def _stopped_in_setup(run_dir: Path | None, stop: StopRequest) -> Preempted:
    """A stop signal before the first step ends the run at once: 75 when the run folder holds a
    checkpoint (it already has the place, and the same command resumes from it), else
    "nothing saved" and 128 + the signal's number, so a requeue line does not loop."""
    signum = stop.signum or signal.SIGTERM
    saved = ckpt.training_checkpoints(run_dir) if run_dir is not None else []
    if saved:
        return Preempted(f"preempted by signal {signum} during set-up: {saved[0]} holds the "
                         "place; run the same command to resume")
    code = exit_code_unsaved(signum)
    return Preempted(f"stopped by signal {signum} during set-up: nothing trained, nothing "
                     f"saved; exit code {code}", code)


def _place(t: Training, state: TrainState) -> str:
    """Where a checkpoint of this state continues, in words."""
    if state.batch_in_epoch >= t.updates_per_epoch * t.plan.accum_steps:
        return f"the end of epoch {state.epoch + 1}, before its evaluation"
    return f"epoch {state.epoch + 1}, batch {state.batch_in_epoch}"


def _best_row(history: list[dict]) -> dict | None:
    """The epoch with the highest test top-1 (the earliest on a tie)."""
    return max(history, key=lambda r: r["eval_top1"], default=None)


def _cooldown_words(recipe: Recipe, total_epochs: int) -> str:
    """' (train.epochs 90 + 10 cool-down)' when the schedule trains more than train.epochs."""
    extra = total_epochs - recipe.train.epochs
    return f" (train.epochs {recipe.train.epochs} + {extra} cool-down)" if extra > 0 else ""


def _final_summary(recipe: Recipe, state: TrainState, run_dir: Path, fit) -> dict:
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
