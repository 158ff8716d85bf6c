"""How a process learns its place in a job (issue 28, items 1, 5 and 7): its device and DDP's
device_ids from one rule, SLURM's variables only inside a job step, a rendezvous that names
the ranks it misses, a stop signal while gathering acted on at once, and an EMA that starts
from the weights every rank trains from."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers_net import free_port

from powergrad.config.loading import load_recipe
from powergrad.system.distributed import (DistInfo, LaunchError, batch_step_note, first_host,
                                          process_device, world_from_env)
from powergrad.training import setup

REPO = Path(__file__).resolve().parent.parent
FASHION = REPO / "recipes" / "fashion_mnist" / "resnet_pgt.yaml"
TINY = ["model.kwargs.channels=[8, 8, 16, 16]", "data.train_subset=64", "data.eval_subset=32",
        "train.batch_size=16", "train.eval_batch_size=32", "train.epochs=1",
        "train.channels_last=false", "train.threads=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")
for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(name, None)
# What srun sets in each task of a 2-task step on this host (the batch script has no STEP_*).
STEP = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0",
        "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "localhost", "SLURM_NNODES": "1"}


# --- item 1: one rule for the device --------------------------------------------------------

@pytest.mark.parametrize("launch, local_rank, visible, expected", [
    ("torchrun on a 4-GPU node: every GPU visible", 3, 4, "cuda:3"),
    ("srun --gpus-per-task=1: each task sees its own GPU only", 3, 1, "cuda:0"),
    ("srun --gpus-per-node=8 with 8 tasks", 7, 8, "cuda:7"),
])
def test_each_launch_form_puts_a_process_on_a_gpu_it_can_see(launch, local_rank, visible,
                                                             expected):
    info = DistInfo(rank=local_rank, local_rank=local_rank, world_size=8, local_world_size=8)
    assert str(process_device("cuda", info, visible)) == expected, launch
    assert str(process_device("cpu", info, 0)) == "cpu"


def test_fewer_gpus_than_processes_is_one_line():
    info = DistInfo(rank=2, local_rank=2, world_size=4, local_world_size=4)
    with pytest.raises(LaunchError, match="local rank 2 of 4 .* only 2 GPU"):
        process_device("cuda", info, 2)


def test_ddp_gets_the_models_own_device(monkeypatch):
    """Under srun --gpus-per-task=1 local rank 3's model sits on cuda:0, the only GPU its task
    sees: DDP must be given that device, not cuda:3 (which it would move every input to)."""
    recipe = load_recipe(FASHION, TINY)
    t = setup.build_training(recipe, with_data=False)
    t.device = torch.device("cuda", 0)  # what process_device gives local rank 3 there
    t.dist_info = DistInfo(rank=3, local_rank=3, world_size=4, local_world_size=4)
    given = {}

    def record(module, **kwargs):
        given.update(kwargs)
        return module

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", record)
    t.wrap()
    assert given["device_ids"] == [0]
    assert given["gradient_as_bucket_view"] is True


# --- item 5: SLURM's variables count only inside a job step -----------------------------------

def test_the_batch_step_is_one_process_with_a_note_and_a_step_is_read():
    batch = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_JOB_NODELIST": "localhost"}
    assert world_from_env(batch) == DistInfo()
    assert "not in a job step" in batch_step_note(batch)
    assert "srun powergrad train" in batch_step_note(batch)
    task = {**STEP, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
    assert world_from_env(task) == DistInfo(rank=1, local_rank=1, world_size=2,
                                            local_world_size=2)
    assert batch_step_note(task) is None
    assert batch_step_note({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None


@pytest.mark.parametrize("change, words", [
    ({"SLURM_STEP_NUM_TASKS": "two"}, "SLURM_STEP_NUM_TASKS='two' is not a whole number"),
    ({"SLURM_PROCID": "5"}, "SLURM_PROCID=5 with SLURM_STEP_NUM_TASKS=2"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x'"),
])
def test_malformed_slurm_values_are_one_line(change, words):
    with pytest.raises(LaunchError) as err:
        world_from_env({**STEP, "SLURM_PROCID": "0", **change})
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("nodelist", ["gpu[03-", "gpu[a-b]", "[01-02]", ""])
def test_a_node_list_that_cannot_be_read_is_refused(nodelist):
    with pytest.raises(LaunchError, match="cannot read the SLURM node list"):
        first_host(nodelist)


def task(tmp_path, rank: int, *extra, job: int | None = None) -> subprocess.Popen:
    """One srun-style task of a 2-task step on this host."""
    env = {**ENV, **STEP, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
           "MASTER_PORT": str(free_port()), "SLURM_JOB_ID": str(job or os.getpid())}
    return subprocess.Popen(
        [sys.executable, "-m", "powergrad", "train", str(FASHION), *TINY,
         f"log.output={tmp_path}", *extra], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


@pytest.mark.subprocess
@pytest.mark.cluster
def test_a_rank_that_never_starts_is_named_after_the_timeout(tmp_path):
    start = time.monotonic()
    alone = task(tmp_path, 0, "train.rendezvous_timeout=3")
    out, _ = alone.communicate(timeout=120)
    assert alone.returncode == 2, out
    assert "launch error: rank(s) 1 of 2 did not join within 3 s" in out
    assert "Traceback" not in out
    assert time.monotonic() - start < 60  # not torch's 300 s store timeout
    assert not (tmp_path / "resnet_pgt" / "run.lock").exists()  # the lock went with it


@pytest.mark.subprocess
@pytest.mark.cluster
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_a_stop_signal_while_gathering_ends_the_process_at_once(tmp_path, signum):
    """Rank 0 of 2 waits for a rank that never comes (a batch-script slip): SIGTERM (or
    submitit's SIGUSR2) ends it within seconds, saying nothing was saved, exit 128 + N."""
    alone = task(tmp_path, 0)
    line = alone.stdout.readline()  # "== recipe -> run folder": set-up has begun
    assert line.startswith("=="), line
    time.sleep(2)  # into the wait
    alone.send_signal(signum)
    out, _ = alone.communicate(timeout=30)
    assert alone.returncode == 128 + signum, out
    assert "nothing trained, nothing saved" in out and "Traceback" not in out


@pytest.mark.subprocess
def test_powergrad_train_in_a_batch_script_trains_as_one_process(tmp_path):
    batch = dict(ENV, SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0",
                 SLURM_JOB_ID="7", SLURM_JOB_NODELIST="localhost")
    run = subprocess.run([sys.executable, "-m", "powergrad", "train", str(FASHION), *TINY,
                          "--fast-dev-run", "1"], env=batch, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not in a job step" in run.stdout
    assert "batch: 1 process" in run.stdout


# --- item 7: the EMA starts from the weights every rank trains from ---------------------------

def _ema_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo")
    recipe = load_recipe(FASHION, [*TINY, "train.model_ema=true", "train.sync_bn=true",
                                   "train.amp_dtype=bfloat16"])
    t = setup.build_training(recipe, with_data=False)
    t.wrap()  # DDP over the CPU's SyncBN (DDP refuses an nn.SyncBatchNorm on a CPU module)
    torch.save({"ema": t.ema.module.state_dict(), "model": t.model.state_dict()},
               f"{out}/rank{rank}.pt")
    # one step's forward and backward: SyncBN's statistics under bf16
    with torch.autocast(t.device.type, dtype=t.amp_dtype):
        t.train_model(torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(rank))
                      ).float().sum().backward()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.cluster
def test_under_ddp_the_ema_equals_the_broadcast_weights_on_every_rank(tmp_path):
    """Each rank seeds its own weights (seed + rank); DDP gives every rank rank 0's. The EMA
    must hold those too, or eval_ema sums shares scored by different models. With SyncBN on
    the CPU under bf16 autocast, as gpu-check's engine row trains, a step runs."""
    mp.start_processes(_ema_rank, args=(free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, weight in ranks[0]["model"].items():
        assert torch.equal(weight, ranks[1]["model"][name]), name  # DDP's broadcast
        assert torch.equal(ranks[0]["ema"][name], weight), name
        assert torch.equal(ranks[1]["ema"][name], weight), name


class Stopped:
    """A StopRequest as the signal handler leaves it."""
    requested, signum = True, signal.SIGTERM


def test_a_stop_never_leaves_a_group_the_others_saw_complete():
    """The group's fate is decided once, in the store: a rank stopped before everyone arrived
    abandons it and a later arrival follows (it does not go on to wait in
    init_process_group for a rank that left); a rank stopped after everyone arrived goes on
    with the others (the engine's first agreement acts on the stop)."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from powergrad.system.distributed import StoppedWhileGathering, _wait_for_every_rank

    def store():
        return dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=timedelta(seconds=10),
                             wait_for_workers=False)

    def rank(r):
        return DistInfo(rank=r, local_rank=r, world_size=2, local_world_size=2)

    deadline = time.monotonic() + 30
    first = store()  # rank 1 stopped while alone: abandons; rank 0 arrives later and follows
    with pytest.raises(StoppedWhileGathering, match="signal"):
        _wait_for_every_rank(first, rank(1), deadline, 30, "here", Stopped())
    with pytest.raises(StoppedWhileGathering, match="another process was stopped"):
        _wait_for_every_rank(first, rank(0), deadline, 30, "here", None)

    second = store()  # rank 0 waits; rank 1 arrives with a stop pending: the group holds
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(
        _wait_for_every_rank(second, rank(0), deadline, 30, "here", None) or "went on"))
    waiter.start()
    time.sleep(0.5)
    _wait_for_every_rank(second, rank(1), deadline, 30, "here", Stopped())  # returns
    waiter.join(10)
    assert outcome == ["went on"]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.cluster
def test_sigterm_to_the_launcher_during_set_up_ends_every_worker_with_nothing_saved(tmp_path):
    """`powergrad torchrun` with 2 workers, SIGTERM as soon as rank 0 begins its set-up: no
    worker may be left waiting for one that left (it hung in init_process_group), and with no
    checkpoint yet the launcher says nothing was saved and exits 143, not 75."""
    job = subprocess.Popen(
        [sys.executable, "-m", "powergrad", "torchrun", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "train",
         str(FASHION), *TINY, f"log.output={tmp_path}"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [job.stdout.readline()]
    while not lines[-1].startswith("=="):
        assert lines[-1] or job.poll() is None, "".join(lines)
        lines.append(job.stdout.readline())
    start = time.monotonic()
    job.send_signal(signal.SIGTERM)
    out = "".join(lines) + job.communicate(timeout=120)[0]
    assert job.returncode == 143, out
    assert "SIGTERM: nothing saved (stopped before its first save)" in out
    assert time.monotonic() - start < 60, out
    assert not list(tmp_path.rglob("*.pth"))
