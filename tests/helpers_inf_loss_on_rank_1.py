"""Run as each process of a 2-process run (torchrun's variables set by the test): `powergrad
train` in real float16 with a GradScaler on the CPU (fit_to_machine made to keep float16, as
tests/test_engine.py's fp16 test does), rank 1's loss made inf at its INF_AT_LOSS-th call
(the time written to INF_STAMP). Exits with the CLI's code."""
import dataclasses
import os
import sys
import time
from pathlib import Path

from powergrad.commands.cli import main
from powergrad.training import engine, setup

real_fit = setup.fit_to_machine
real_build = engine.build_training


def as_on_a_gpu(recipe, device, images_per_step):
    fit = real_fit(recipe, device, images_per_step)
    return dataclasses.replace(fit, amp_dtype=recipe.train.amp_dtype,
                               notes=[n for n in fit.notes if "float16" not in n])


def build_training(recipe, *args, **kwargs):
    t = real_build(recipe, *args, **kwargs)
    if t.dist_info.rank == 1:
        calls, real_loss = [], t.loss_fn

        def loss_fn(logits, targets):
            loss = real_loss(logits, targets)
            calls.append(1)
            if len(calls) != int(os.environ["INF_AT_LOSS"]):
                return loss
            Path(os.environ["INF_STAMP"]).write_text(str(time.time()))
            # times inf, not plus: the gradients overflow too, so the scaler skips the step on
            # every rank (DDP sums them) and the weights stay finite; only this loss shows it
            return loss * float("inf")

        t.loss_fn = loss_fn
    return t


setup.fit_to_machine = as_on_a_gpu
engine.build_training = build_training
raise SystemExit(main(["train", *sys.argv[1:]]))
