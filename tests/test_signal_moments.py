"""A stop signal at any moment of a run (issue 27, item 7): set-up, a training step, the
evaluation, the checkpoint save. Each ends in exit 75 with a checkpoint the same command
resumes from, or, before anything could be saved, in "nothing saved" and 128 + N; a signal
during the last epoch's evaluation or save lets the finished run end as finished. Never does
a run train on past the signal."""
from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
from helpers_signals import handler_before_the_run

from powergrad.config.loading import load_recipe
from powergrad.system.preemption import Preempted
from powergrad.training import checkpoint as ckpt
from powergrad.training import engine, step

pytestmark = pytest.mark.slow
FASHION = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist" / "resnet_pgt.yaml"
TINY = ["model.kwargs.channels=[8, 8, 16, 16]", "data.train_subset=256", "data.eval_subset=64",
        "train.batch_size=32", "train.eval_batch_size=64", "train.epochs=2",
        "train.channels_last=false", "train.threads=1", "log.log_interval=100"]
STEPS_PER_EPOCH, EPOCHS = 8, 2  # 256 images in batches of 32


def signal_on_call(monkeypatch, owner, name: str, at: int, signum: int) -> None:
    """The signal arrives as the `at`-th call of owner.name begins."""
    real, calls = getattr(owner, name), []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, signalled)


def moments(count: int, seed: int = 0) -> list[tuple[str, int, int]]:
    """Seeded (phase, which call, signal) triples over every phase of the run."""
    rng = random.Random(seed)
    picks = [("set-up", 1), ("evaluation", 1), ("save", 1), ("evaluation", 2), ("save", 2)]
    picks += [("step", rng.randint(1, STEPS_PER_EPOCH * EPOCHS)) for _ in range(count)]
    return [(phase, at, rng.choice([signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]))
            for phase, at in picks]


@pytest.mark.parametrize("phase, at, signum", moments(3))
def test_a_signal_at_any_moment_stops_the_run_resumably_or_says_nothing_was_saved(
        tmp_path, monkeypatch, phase, at, signum):
    owner, name = {"set-up": (engine, "build_training"), "evaluation": (engine, "evaluate"),
                   "save": (engine, "save"), "step": (step, "clip_gradients")}[phase]
    signal_on_call(monkeypatch, owner, name, at, signum)
    recipe = load_recipe(FASHION, TINY + [f"log.output={tmp_path}"])
    last = tmp_path / "resnet_pgt" / "last.pth"
    with handler_before_the_run() as (_, received):
        try:
            summary = engine.train(recipe)
        except Preempted as stop:
            code, message = stop.exit_code, str(stop)
        else:
            code, message = 0, ""
    assert received == []  # the run's own handler took it
    if phase == "set-up":  # nothing trained yet and no checkpoint to go back to
        assert code == 128 + signum and "nothing saved" in message
        assert not last.exists()
        return
    if phase in ("evaluation", "save") and at == EPOCHS:  # the last epoch had trained
        assert code == 0 and summary["epochs"] == EPOCHS
        return
    assert code == 75, message
    state = ckpt.read_training(last)["state"]
    stopped_at = state["num_updates"]
    if phase == "step":  # the step it arrived in is the last one taken
        assert stopped_at == at
    else:  # evaluation or save of epoch 1: the epoch's end is the place
        assert (stopped_at, state["epoch"], state["batch_in_epoch"]) == (STEPS_PER_EPOCH, 1, 0)
