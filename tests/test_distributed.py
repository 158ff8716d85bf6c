"""The DDP code path on the CPU: torchrun with two processes and the gloo backend."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers_net import free_port
from powergrad import checkpoint as ckpt
from powergrad.recipe import DataConfig
from powergrad.data.fashion_mnist import build_fashion_mnist_loaders
from powergrad.engine import evaluate
from powergrad.models import build_model
from powergrad.recipe import load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist" / "resnet_pgt.yaml"
OVERRIDES = ["model.kwargs.channels=[8, 16, 32, 64]", "data.train_subset=512",
             "data.eval_subset=301", "train.batch_size=32", "train.eval_batch_size=100",
             "train.epochs=1", "train.channels_last=false", "train.threads=1"]


def test_torchrun_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "powergrad", "train", str(RECIPE), *OVERRIDES,
           f"log.output={tmp_path}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run_dir = tmp_path / "resnet_pgt"
    final = json.loads((run_dir / "final.json").read_text())
    assert final["updates"] == 512 // 2 // 32  # each rank takes half of the samples

    # test metrics summed over the two ranks equal one process evaluating the saved model
    recipe = load_recipe(run_dir / "recipe.yaml")
    model = build_model(recipe.model)
    model.load_state_dict(ckpt.load(run_dir / "last.pth")["model"])
    _, eval_loader = build_fashion_mnist_loaders(DataConfig(eval_subset=301), batch_size=32,
                                                 eval_batch_size=100, seed=0, device="cpu")
    single = evaluate(model, eval_loader, torch.device("cpu"), None)
    assert abs(single["top1"] - final["final_test_top1"]) < 1e-9


def torchrun(tmp_path, *extra, launcher=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *launcher,
           "-m", "powergrad", "train", str(RECIPE), *OVERRIDES, "loss.mixup=0.5",
           "data.train_subset=1024", "train.batch_size=16", "log.log_interval=4",
           f"log.output={tmp_path}", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    straight = torchrun(out)
    log, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, log[-3000:]
    return ckpt.load(out / "resnet_pgt" / "last.pth")


def wait_for(proc, line: str, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while line not in proc.stdout.readline():  # plain progress lines (not a terminal)
        assert time.time() < deadline and proc.poll() is None


def assert_same_training(a: dict, b: dict) -> None:
    assert a["state"]["num_updates"] == b["state"]["num_updates"] == 32
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for rank_a, rank_b in zip(a["rank_states"], b["rank_states"]):
        assert torch.equal(rank_a["rng"]["torch"], rank_b["rng"]["torch"])


def test_sigterm_to_torchrun_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    """torchrun forwards SIGTERM to its workers: both stop after the same step and save; the
    launcher itself exits 1 (torchrun's own behaviour). The same command then resumes every
    rank's random streams and running sums, so mixup draws and weights match exactly."""
    stopped = torchrun(tmp_path / "b")
    wait_for(stopped, "epoch 1/1 12/32")
    stopped.send_signal(signal.SIGTERM)
    out, _ = stopped.communicate(timeout=300)
    assert "preempted: saved" in out, out[-3000:]
    saved = ckpt.load(tmp_path / "b" / "resnet_pgt" / "last.pth")
    assert len(saved["rank_states"]) == 2 and 0 < saved["state"]["batch_in_epoch"] < 32

    resumed = torchrun(tmp_path / "b")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resumed from" in out, out[-3000:]
    assert_same_training(uninterrupted, ckpt.load(tmp_path / "b" / "resnet_pgt" / "last.pth"))


def test_a_killed_worker_is_restarted_by_torchrun_and_resumes_exactly(tmp_path, uninterrupted):
    """kill -9 of one worker: torchrun (--max-restarts 1) stops the other and starts both
    again; they resume from the newest step checkpoint (a dead rank 0's lock is stale and
    taken over) and end with the uninterrupted run's weights."""
    run = torchrun(tmp_path, "log.checkpoint_every=4", launcher=("--max-restarts", "1"))
    wait_for(run, "epoch 1/1 20/32")
    workers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True)
    victim = int(workers.stdout.split()[-1])
    os.kill(victim, signal.SIGKILL)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out[-3000:]
    assert "resumed from" in out and "step-0000000" in out
    assert_same_training(uninterrupted, ckpt.load(tmp_path / "resnet_pgt" / "last.pth"))
