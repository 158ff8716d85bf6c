"""A stop signal at any moment of a run (issue 27, item 7): set-up, a training step, the
evaluation, the checkpoint save. Each ends in exit 75 with a checkpoint the same command
resumes from, and the resumed run ends where an uninterrupted one does; before anything could
be saved it ends in "nothing saved" and 128 + N. A signal in the last epoch's evaluation stops
it too (the report's "trained epoch 2 and exited 0": a signal meant for epoch 1's evaluation
that landed in epoch 2's, which used to run to the end); only one in the last save, when
everything is trained and evaluated, lets the finished run end as finished.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_net import free_port
from helpers_signals import handler_before_the_run, train_as_the_command_does

from powergrad.config.loading import load_recipe
from powergrad.report.events import read_scalars
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    engine.train(load_recipe(FASHION, TINY + [f"log.output={out}"]))
    return out / "resnet_pgt"


def place(phase: str, at: int) -> tuple[int, int, int]:
    """(optimizer steps, finished epochs, batch in the epoch) a stop at this moment saves."""
    if phase == "step":  # the step it arrived in is the last one taken
        return at, (at - 1) // STEPS_PER_EPOCH, (at - 1) % STEPS_PER_EPOCH + 1
    if phase == "evaluation":  # the epoch has trained; its evaluation runs on resume
        return at * STEPS_PER_EPOCH, at - 1, STEPS_PER_EPOCH
    return at * STEPS_PER_EPOCH, at, 0  # the save of epoch `at` is the place


@pytest.mark.parametrize("phase, at, signum", moments(2))
def test_a_signal_at_any_moment_stops_the_run_resumably_or_says_nothing_was_saved(
        tmp_path, monkeypatch, uninterrupted, phase, at, signum):
    owner, name = {"set-up": (engine, "build_training"), "evaluation": (engine, "evaluate"),
                   "save": (engine, "save"), "step": (step, "clip_gradients")}[phase]
    with monkeypatch.context() as patch:
        signal_on_call(patch, owner, name, at, signum)
        recipe = load_recipe(FASHION, TINY + [f"log.output={tmp_path}"])
        last = tmp_path / "resnet_pgt" / "last.pth"
        with handler_before_the_run() as (_, received):
            try:
                summary = train_as_the_command_does(recipe)
            except Preempted as stop:
                code, message = stop.exit_code, str(stop)
            else:
                code, message = 0, ""
    assert received == []  # the run's own handler took it
    if phase == "set-up":  # nothing trained yet and no checkpoint to go back to
        assert code == 128 + signum and "nothing saved" in message
        assert not last.exists()
        return
    if phase == "save" and at == EPOCHS:  # trained, evaluated and being saved: finished
        assert code == 0 and summary["epochs"] == EPOCHS
    else:
        assert code == 75, message
        state = ckpt.read_training(last)["state"]
        assert (state["num_updates"], state["epoch"], state["batch_in_epoch"]) == place(
            phase, at)
        train_as_the_command_does(recipe)  # the same command again, no signal
    # ends as the uninterrupted run: weights, each epoch's figures, each scalar logged once
    assert_same_run(tmp_path / "resnet_pgt", uninterrupted)
    assert read_scalars(tmp_path / "resnet_pgt")["eval/top1"] == read_scalars(
        uninterrupted)["eval/top1"]


def assert_same_run(run_dir: Path, uninterrupted: Path) -> None:
    """The same final weights and the same figures in every epoch's summary row."""
    weights = ckpt.load(run_dir / "last.pth")["model"]
    for key, value in ckpt.load(uninterrupted / "last.pth")["model"].items():
        assert torch.equal(weights[key], value), key
    columns = ["train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "train_images"]
    assert ([[row[c] for c in columns] for row in read_csv(run_dir)]
            == [[row[c] for c in columns] for row in read_csv(uninterrupted)])


def read_csv(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


# Two processes: 4 optimizer steps per epoch each (fewer than AGREE_EVERY, so a stop in
# training is agreed at the next evaluation's first batch), one evaluation batch each.
TWO = [str(FASHION), *TINY, "data.eval_subset=100", "train.eval_batch_size=32"]


def two_processes(out: Path, **signal_env) -> tuple[list[int], str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo",
               WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), **signal_env)
    procs = [subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "helpers_signal_on_rank_1.py"), *TWO,
         f"log.output={out}"], env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(
        f"--- rank {rank}:\n{log[-2000:]}" for rank, log in enumerate(logs))


@pytest.fixture(scope="module")
def uninterrupted_two(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight_two")
    codes, said = two_processes(out)
    assert codes == [0, 0], said
    return out / "resnet_pgt"


@pytest.mark.subprocess
@pytest.mark.cluster
@pytest.mark.parametrize("phase, at, place_saved", [
    ("evaluation", 1, (4, 0, 4)), ("evaluation", 2, (8, 1, 4)), ("step", 6, (8, 1, 4))])
def test_a_signal_on_one_of_two_processes_stops_both_at_one_place_and_resumes_exactly(
        tmp_path, uninterrupted_two, phase, at, place_saved):
    """Rank 1 alone is signalled; both stop at the evaluation's first batch (the agreement),
    save the place "epoch trained, before its evaluation" (the last epoch's included) and
    exit 75; the same command ends with the uninterrupted run's weights and figures."""
    codes, said = two_processes(tmp_path, SIGNAL_PHASE=phase, SIGNAL_AT=str(at))
    assert codes == [75, 75], said
    assert "before its evaluation" in said, said
    last = tmp_path / "resnet_pgt" / "last.pth"
    state = ckpt.read_training(last)["state"]
    assert (state["num_updates"], state["epoch"], state["batch_in_epoch"]) == place_saved
    codes, said = two_processes(tmp_path)
    assert codes == [0, 0], said
    assert_same_run(tmp_path / "resnet_pgt", uninterrupted_two)
