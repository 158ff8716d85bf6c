"""A run's checkpoints from the engine's side: what a save holds (every rank's RNG state and
running sums), restoring it exactly, and refusing a checkpoint trained with other settings."""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from powergrad.config.loading import load_recipe
from powergrad.config.schema import Recipe
from powergrad.system.distributed import gather_objects
from powergrad.training import checkpoint as ckpt
from powergrad.training.rundir import RunDirError, recipe_changes
from powergrad.training.setup import Training
from powergrad.training.step import NonFiniteError, TrainState


def save(t: Training, state: TrainState, run_dir: Path, *, is_best: bool = False,
         step: bool = False) -> None:
    """last.pth (or step-N.pth), and best.pth (weights only) for the best epoch. Every rank
    takes part: each contributes its own RNG state and running sums."""
    if not all(torch.isfinite(p).all() for p in t.model.parameters()):
        raise NonFiniteError(f"non-finite weights at optimizer step {state.num_updates}")
    rank_states = gather_objects({"rng": ckpt.rng_state(t.device),
                                   "epoch_totals": dict(state.epoch_totals)})
    if not t.dist_info.is_main:
        return
    payload = ckpt.training_payload(
        model_state=t.model.state_dict(), optimizer=t.optimizer, scheduler=t.scheduler,
        scaler=t.scaler, ema_state=t.ema.module.state_dict() if t.ema is not None else None,
        state=asdict(state), rank_states=rank_states, recipe=t.recipe)
    if step:
        ckpt.save_step_checkpoint(payload, run_dir, state.num_updates,
                                  t.recipe.log.keep_checkpoints)
        return
    ckpt.save_atomic(payload, run_dir / "last.pth")
    if is_best:
        ckpt.save_atomic(ckpt.weights_payload(payload), run_dir / "best.pth")


def check_checkpoint_recipe(path: Path, payload: dict, recipe: Recipe) -> None:
    if payload["recipe_digest"] == recipe.digest():
        return
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "recipe.yaml"
        saved.write_text(payload["recipe_yaml"])
        changes = recipe_changes(load_recipe(saved), recipe)
    raise RunDirError(f"{path} was trained with other settings: {'; '.join(changes)}. Undo "
                      "the change to continue it, or start a new run (log.experiment=NAME).")


def restore(payload: dict, t: Training) -> tuple[TrainState, list[str]]:
    """The checkpoint's weights, optimizer, schedule, scaler, EMA and this rank's RNG state and
    running sums into the bare model and the run's parts; the TrainState to continue from, and
    notes on what this machine could not take over (a scaler, a CUDA random state)."""
    model, optimizer, scheduler, scaler, ema, dist_info = (
        t.model, t.optimizer, t.scheduler, t.scaler, t.ema, t.dist_info)
    known = TrainState.__dataclass_fields__
    state = TrainState(**{k: v for k, v in payload["state"].items() if k in known})
    rank_states = payload["rank_states"]
    if state.batch_in_epoch and len(rank_states) != dist_info.world_size:
        raise ckpt.CheckpointError(
            f"the checkpoint was saved inside epoch {state.epoch + 1} by {len(rank_states)} "
            f"process(es); resume it with the same number (this launch has "
            f"{dist_info.world_size}) or from an end-of-epoch checkpoint")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    notes = restore_scaler(scaler, payload["scaler"])
    if ema is not None and payload["ema"] is not None:
        ema.module.load_state_dict(payload["ema"])
    mine = rank_states[dist_info.rank % len(rank_states)]
    notes += ckpt.restore_rng_state(mine["rng"], t.device)
    state.epoch_totals = dict(mine["epoch_totals"])
    scheduler.step_update(num_updates=state.num_updates)
    return state, notes


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> list[str]:
    """The saved GradScaler state when the checkpoint and this run both use one; otherwise
    this run's own (fresh or off) scaler, with a note. The recipe's digest is the same either
    way: float16 on a CPU trains in bfloat16 without a scaler."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)
        return []
    if scaler.is_enabled():
        return [f"the checkpoint was saved without a GradScaler (float16 runs as bfloat16 on "
                f"the CPU); this float16 run starts a fresh one at scale "
                f"{scaler.get_scale():g} (its first steps may be skipped while the scale settles)"]
    if saved:
        return [f"the checkpoint's GradScaler (scale {saved.get('scale', 0):g}) is not used: "
                "this run trains without one (float16 runs as bfloat16 on the CPU)"]
    return []
