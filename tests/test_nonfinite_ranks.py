"""A non-finite loss on one rank stops every rank: under fp16 with a GradScaler an inf loss on
one rank only skips the step on all of them, so the ranks must agree at the fold before any
raises, or the others wait in the next all-reduce."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers_net import free_port

from powergrad.system.exit_codes import EXIT_DIVERGED
from powergrad.training.rundir import LOCK_NAME
from powergrad.training.step import NonFiniteError, RunningSums

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "fashion_mnist" / "resnet_pgt.yaml"
# 2 processes, 8 optimizer steps each, folds every 2 steps; float16 asked for
RUN = [str(RECIPE), "model.kwargs.channels=[8, 16, 32, 64]", "data.train_subset=512",
       "data.eval_subset=100", "train.batch_size=32", "train.eval_batch_size=100",
       "train.epochs=1", "train.channels_last=false", "train.threads=1",
       "train.amp_dtype=float16", "log.log_interval=2"]
START_LIMIT = 180  # seconds to import, rendezvous and load data on 2 busy cores
STOP_LIMIT = 60  # seconds from the inf loss to both processes' exit


def test_one_process_folds_without_a_collective(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("a collective"))
    sums = RunningSums(torch.device("cpu"))
    labels = torch.tensor([0, 1])
    sums.add(torch.tensor(0.5), torch.eye(2), labels, wait=0.0)
    sums.fold("step 1")
    assert sums.epoch["seen"] == 2 and sums.epoch["loss"] == 1.0
    sums.add(torch.tensor(float("inf")), torch.eye(2), labels, wait=0.0)
    with pytest.raises(NonFiniteError, match=r"^training loss inf by step 2$"):
        sums.fold("step 2")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.cluster
def test_an_inf_loss_on_rank_1_stops_both_ranks_with_exit_3_and_frees_the_lock(tmp_path):
    stamp, port = tmp_path / "inf_at", free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo",
               WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), INF_AT_LOSS="3", INF_STAMP=str(stamp))
    logs = [open(tmp_path / f"rank{rank}.log", "w+") for rank in (0, 1)]
    procs = [subprocess.Popen(
        [sys.executable, str(HERE / "helpers_inf_loss_on_rank_1.py"), *RUN,
         f"log.output={tmp_path}"], env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
        stdout=logs[rank], stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    start = time.time()
    try:
        while any(p.poll() is None for p in procs):
            injected = float(stamp.read_text() or 0) if stamp.exists() else None
            limit = injected + STOP_LIMIT if injected else start + START_LIMIT
            if time.time() > limit:
                break
            time.sleep(0.2)
    finally:
        hung = [rank for rank, p in enumerate(procs) if p.poll() is None]
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    out = [log.seek(0) or log.read() for log in logs]
    said = "\n".join(f"--- rank {rank}:\n{text[-2000:]}" for rank, text in enumerate(out))
    assert stamp.exists(), said  # rank 1's loss was made inf
    assert not hung, f"rank(s) {hung} still running {STOP_LIMIT} s after the inf loss\n{said}"
    assert [p.returncode for p in procs] == [EXIT_DIVERGED] * 2, said
    assert "diverged: training loss inf by epoch 1/1" in out[1], said
    assert "diverged: training loss non-finite on another process by epoch 1/1" in out[0], said
    assert "autocast float16" in out[0], said  # the GradScaler's path, not bf16's
    # one rank's loss only: the scaler skipped the inf step everywhere (else rank 0's next
    # loss would be NaN from NaN weights, 2 of 2)
    assert all("(1 of 2 processes)" in text and "Traceback" not in text for text in out), said
    run_dir = tmp_path / "resnet_pgt"
    assert run_dir.is_dir() and not (run_dir / LOCK_NAME).exists()
