"""The batch arithmetic of a run: how many images one process takes per forward pass, how
many forward passes make one optimizer step, and how many images that step sees in total.

A paper's learning rate belongs to its total batch (the PGT paper: lr 0.4 for 1024 images per
step). A recipe that sets `train.global_batch` keeps that total on any number of processes:
the micro-batch and the accumulation are derived from the world size, and a world size that
cannot give the total exactly is refused before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass


class BatchPlanError(ValueError):
    """The recipe's total batch cannot be met exactly on this many processes."""


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch: int  # images per process per forward/backward
    accum_steps: int  # forward/backward passes per optimizer step

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.accum_steps

    def describe(self) -> str:
        return (f"{self.world_size} process(es) x {self.micro_batch} images x "
                f"{self.accum_steps} accumulation step(s) = {self.global_batch} per step")


def plan_batch(global_batch: int | None, batch_size: int, grad_accum_steps: int,
               world_size: int) -> BatchPlan:
    """The plan for `world_size` processes.

    global_batch None: the per-process settings as given (timm's meaning of --batch-size).
    global_batch set: `batch_size` is the largest micro-batch a process may take; the fewest
    accumulation steps that fit it are used, and grad_accum_steps must be left at 1 (the plan
    owns it).
    """
    if world_size < 1:
        raise BatchPlanError(f"world size must be >= 1, got {world_size}")
    if global_batch is None:
        return BatchPlan(world_size, batch_size, grad_accum_steps)
    if grad_accum_steps != 1:
        raise BatchPlanError(
            f"train.grad_accum_steps is {grad_accum_steps} but train.global_batch is set: "
            "accumulation is derived from the global batch; leave grad_accum_steps at 1")
    if global_batch % world_size:
        raise BatchPlanError(
            f"train.global_batch {global_batch} cannot be split evenly over {world_size} "
            f"processes; use a world size that divides it")
    per_process = global_batch // world_size
    # The fewest accumulation steps whose micro-batch fits batch_size and divides evenly.
    for accum in range(-(-per_process // batch_size), per_process + 1):
        if per_process % accum == 0:
            return BatchPlan(world_size, per_process // accum, accum)
    raise AssertionError("unreachable: accum = per_process always divides")
