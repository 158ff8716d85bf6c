"""One optimizer step and the epoch that repeats it, read as nanoGPT's loop: the epoch walks
over accumulation groups; `train_step` runs one group's forwards and backwards (under
autocast) and the optimizer step; after it, in the same loop, the scalar log, the stop check
and step checkpoints. What the step trains with (`t`: the model, its optimizer, scaler, loss
and loaders) is setup.py's `Training`. `RunningSums` keeps the epoch's and the log window's
sums exactly (float64 on the device between log steps: no host sync per step), so a resumed
epoch reports the same.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from timm.utils import unwrap_model

from powergrad.system.distributed import all_reduce_sum
from powergrad.system.preemption import Preempted, StopRequest
from powergrad.system.progress import Progress
from powergrad.training.clipping import clip_gradients
from powergrad.training.runlog import RunLog
from powergrad.training.setup import Training
from powergrad.transform import logit_stats


class NonFiniteError(FloatingPointError):
    """The loss, the weights or the evaluation went non-finite; nothing of it was saved."""


@dataclass
class TrainState:
    """What a checkpoint must hold besides module states to continue exactly."""
    epoch: int = 0  # the next epoch to run
    num_updates: int = 0  # optimizer steps so far (the TensorBoard x axis)
    history: list = field(default_factory=list)  # one summary row per finished epoch
    # Micro-batches of `epoch` already trained and the epoch's running sums: set when
    # preempted mid-epoch (a resumed run replays the loader past them and goes on) and once
    # the epoch has trained, until its evaluation is done (a resumed run then only evaluates).
    batch_in_epoch: int = 0
    epoch_totals: dict = field(default_factory=dict)


class RunningSums:
    """Loss, correct and seen of the epoch so far and of the current log window."""

    def __init__(self, device: torch.device, epoch_totals: dict | None = None):
        self.device = device
        self.epoch = dict(epoch_totals) if epoch_totals else dict(loss=0.0, correct=0.0, seen=0,
                                                                  wait=0.0)
        self.seen_before = self.epoch["seen"]  # samples trained before a preemption
        # seconds this epoch trained in earlier allocations (checkpoints before this count: 0)
        self.seconds_before = self.epoch.pop("seconds", 0.0)
        self.start = time.perf_counter()
        self.reset_window()
        self._clear_pending()

    def seconds_now(self) -> float:
        """Seconds this epoch has trained in this allocation so far."""
        return time.perf_counter() - self.start

    def to_save(self) -> dict:
        """The epoch's sums as a checkpoint holds them: with its training seconds so far, so
        an epoch finished after a requeue reports its whole time."""
        return {**self.epoch, "seconds": self.seconds_before + self.seconds_now()}

    def _clear_pending(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.pending = dict(loss=zero.clone(), correct=zero.clone(), seen=0, wait=0.0)

    def reset_window(self) -> None:
        self.window = dict(loss=0.0, correct=0.0, seen=0, start=time.perf_counter(), wait=0.0)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
            wait: float) -> None:
        self.pending["loss"] += loss.detach().double() * labels.shape[0]
        self.pending["correct"] += (logits.detach().argmax(-1) == labels).sum()  # unmixed labels
        self.pending["seen"] += labels.shape[0]
        self.pending["wait"] += wait

    def fold(self, where: str) -> None:
        """Move the device-side sums to the host (one sync); a non-finite loss since the last
        fold stops the run here, before anything is saved. Every rank folds at the same steps,
        and under DDP they agree first (one all-reduce of a flag): with a GradScaler an inf
        loss on one rank only skips the step everywhere, so the others would go on alone."""
        if self.pending["seen"] == 0:
            return
        bad = (~torch.isfinite(self.pending["loss"])).double()
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if ranks > 1:
            dist.all_reduce(bad)  # queued on the device: the tolist below stays the one sync
        loss_sum, correct, bad_ranks = torch.stack([self.pending["loss"],
                                                    self.pending["correct"].double(),
                                                    bad]).tolist()
        if bad_ranks:
            which = f" ({int(bad_ranks)} of {ranks} processes)" if ranks > 1 else ""
            value = loss_sum if not math.isfinite(loss_sum) else "non-finite on another process"
            raise NonFiniteError(f"training loss {value} by {where}{which}")
        for acc in (self.epoch, self.window):
            acc["loss"] += loss_sum
            acc["correct"] += correct
            acc["seen"] += self.pending["seen"]
            acc["wait"] += self.pending["wait"]
        self._clear_pending()

    def window_scalars(self, lr: float, world_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.window["start"], 1e-9)
        seen = max(self.window["seen"], 1)
        return {"train/loss": self.window["loss"] / seen,
                "train/top1": 100 * self.window["correct"] / seen, "train/lr": lr,
                "perf/img_per_sec": self.window["seen"] * world_size / elapsed,
                "perf/data_wait_frac": self.window["wait"] / elapsed}

    def progress_values(self) -> dict[str, str]:
        """Loss and top-1 so far; '-' until the first fold (never a made-up 0)."""
        if not self.epoch["seen"]:
            return {"loss": "-", "top1": "-"}
        return {"loss": f"{self.epoch['loss'] / self.epoch['seen']:.3f}",
                "top1": f"{100 * self.epoch['correct'] / self.epoch['seen']:.1f}"}


def timed(batches: Iterator) -> Iterator:
    """(images, labels, seconds waited for them) from a loader's iterator."""
    tick = time.perf_counter()
    for images, labels in batches:
        yield images, labels, time.perf_counter() - tick
        tick = time.perf_counter()


def train_step(t: Training, micro_batches: Iterator, sums: RunningSums | None, state: TrainState,
               measure: bool = False, batch_augment: Callable | None = None) -> dict:
    """One optimizer step over `micro_batches` (accum_steps of (images, labels, wait), drawn
    one forward at a time): augment, mix, forward and backward each (DDP syncs on the last),
    then unscale, clip, step, EMA and schedule. Returns the step's diagnostics (when
    `measure`) and its last logits."""
    model, accum = t.model_to_train(), t.plan.accum_steps
    if t.probe is not None:
        t.probe.enabled = measure  # record the residual stream of this step's forwards only
    for index, (images, labels, wait) in enumerate(micro_batches):
        if batch_augment is not None:  # random erasing after normalisation (timm's order)
            images = batch_augment(images)
        targets = labels
        if t.mixup is not None:
            images, targets = t.mixup(images, labels)
        last = index == accum - 1
        no_sync = not last and t.dist_info.enabled
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(t.device.type, dtype=t.amp_dtype,
                                enabled=t.amp_dtype is not None):
                logits = model(images)
                loss = t.loss_fn(logits, targets)
            t.scaler.scale(loss / accum).backward()
        if sums is not None:
            sums.add(loss, logits, labels, wait)
    t.scaler.unscale_(t.optimizer)
    diagnostics = t.probe.stats() if measure and t.probe is not None else {}
    diagnostics.update(clip_gradients(t.clip_params, t.recipe.clip.clip_mode,
                                      t.recipe.clip.clip_grad, measure=measure))
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    state.num_updates += 1
    if t.ema is not None:
        t.ema.update(unwrap_model(model), step=state.num_updates)
    t.scheduler.step_update(num_updates=state.num_updates)
    if measure:
        alpha = t.recipe.pgt.alpha if t.recipe.pgt.enabled else 1.0
        diagnostics.update({f"pgt/{k}": v for k, v in logit_stats(logits, alpha).items()})
    return diagnostics


def train_one_epoch(t: Training, epoch: int, state: TrainState, log: RunLog, *,
                    stop: StopRequest | None = None,
                    save_step: Callable[[TrainState], None] | None = None,
                    max_steps: int | None = None) -> dict:
    """Train epoch `epoch` from state.batch_in_epoch on: after each optimizer step, the scalar
    log every log.log_interval steps, the stop check (`stop` agreed: the place goes into
    state, then Preempted), `save_step(state)` every log.checkpoint_every steps, the progress
    line. max_steps: end the epoch after that many steps (a fast dev run). Returns the
    epoch's loss, top-1, images, seconds and rates over every process."""
    loader, accum, log_every = t.train_loader, t.plan.accum_steps, t.recipe.log.log_interval
    t.model_to_train().train()
    groups = len(loader) // accum  # a partial accumulation group at the end is dropped
    if max_steps is not None:
        groups = min(groups, max_steps)
    sums = RunningSums(t.device, state.epoch_totals)
    done = state.batch_in_epoch // accum  # > 0 when resuming a preempted epoch
    progress = Progress(len(loader) - state.batch_in_epoch, f"epoch {epoch + 1}/{t.total_epochs}",
                        enabled=t.dist_info.is_main and done < groups, every=log_every)
    # Stopped after the epoch had trained (in its evaluation): nothing to replay or train.
    batches = timed(iter(loader)) if done < groups else iter(())
    for _ in itertools.islice(batches, state.batch_in_epoch):
        pass  # replayed, not trained: the loader's order and augmentation stay in step

    def where(batches_done: int) -> str:  # names the place in an error message
        return (f"epoch {epoch + 1}/{t.total_epochs}, batch {batches_done}/{len(loader)} "
                f"(optimizer step {state.num_updates})")

    for group in range(done, groups):
        measure = t.recipe.log.diagnostics and (state.num_updates + 1) % log_every == 0
        diagnostics = train_step(t, itertools.islice(batches, accum), sums, state, measure,
                                 loader.batch_augment)
        batches_done, last = (group + 1) * accum, group == groups - 1
        if state.num_updates % log_every == 0:  # the scalar log: one host sync
            sums.fold(where(batches_done))
            scalars = sums.window_scalars(t.optimizer.param_groups[0]["lr"],
                                          t.dist_info.world_size)
            scalars.update(diagnostics)
            if t.filters is not None:
                scalars.update(t.filters.counts())
            log.scalars(scalars, state.num_updates)
            sums.reset_window()
        if stop is not None and stop.should_stop(state.num_updates, t.device):
            sums.fold(where(batches_done))
            state.batch_in_epoch, state.epoch_totals = batches_done, sums.to_save()
            progress.close()
            raise Preempted
        if (save_step is not None and not last
                and state.num_updates % t.recipe.log.checkpoint_every == 0):
            sums.fold(where(batches_done))  # a kill loses at most checkpoint_every steps
            state.batch_in_epoch, state.epoch_totals = batches_done, sums.to_save()
            save_step(state)
            state.batch_in_epoch, state.epoch_totals = 0, {}
        if last:  # the epoch's last progress line shows all of it
            sums.fold(where(batches_done))
        progress.update(sums.progress_values(), steps=accum)
    sums.fold(f"epoch {epoch + 1}/{t.total_epochs}, end (optimizer step {state.num_updates})")
    # the epoch has trained: a stop in its evaluation saves this place (engine.run_epoch
    # clears it once the epoch is evaluated and counted)
    state.batch_in_epoch, state.epoch_totals = groups * accum, sums.to_save()
    if t.probe is not None:
        t.probe.enabled = False  # keep evaluation forwards out of the record
    seconds_now = sums.seconds_now()
    seconds = sums.seconds_before + seconds_now  # over every allocation that trained it
    totals = sums.epoch
    loss_sum, correct, seen, seen_now = all_reduce_sum(
        [totals["loss"], totals["correct"], float(totals["seen"]),
         float(totals["seen"] - sums.seen_before)], t.device)
    means = {"loss": loss_sum / max(seen, 1), "top1": 100 * correct / max(seen, 1)}
    # the bar's last line shows every process's images, as the epoch line does
    progress.close({"loss": f"{means['loss']:.4f}", "top1": f"{means['top1']:.2f}"})
    # img_per_sec: the rate of this allocation's images (none: NaN, shown as '-'); images and
    # seconds: the whole epoch's, so the run's rate (runlog.train_img_per_sec) counts each once
    return {**means, "img_per_sec": seen_now / seconds_now if seen_now else float("nan"),
            "data_wait_frac": totals["wait"] / seconds, "seconds": seconds, "images": int(seen)}
