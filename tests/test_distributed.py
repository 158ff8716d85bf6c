"""The DDP code path on the CPU: torchrun with two processes and the gloo backend."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_net import free_port

from powergrad.config.loading import load_recipe
from powergrad.config.schema import DataConfig
from powergrad.data.fashion_mnist import build_fashion_mnist_loaders
from powergrad.system.distributed import SLURM_PORT_BASE, SLURM_PORT_SPAN
from powergrad.system.preemption import AGREE_EVERY
from powergrad.training import checkpoint as ckpt
from powergrad.training.evaluate import evaluate
from powergrad.training.models import build_model

# every test here trains through torchrun or srun-style processes (minutes in all)
pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.cluster]

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist" / "resnet_pgt.yaml"
OVERRIDES = ["model.kwargs.channels=[8, 16, 32, 64]", "data.train_subset=512",
             "data.eval_subset=301", "train.batch_size=32", "train.eval_batch_size=100",
             "train.epochs=1", "train.channels_last=false", "train.threads=1"]


# One run's settings for every launch form below: 2 processes, 32 optimizer steps.
RUN = [str(RECIPE), *OVERRIDES, "loss.mixup=0.5", "data.train_subset=1024",
       "train.batch_size=16", "log.log_interval=4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")


def torchrun(tmp_path, *extra, launcher=("--nproc_per_node", "2"),
             program=("-m", "powergrad", "train"), host=None, log=subprocess.PIPE,
             powergrad_launcher=False):
    """Plain torchrun, or `powergrad torchrun` (then the program is `powergrad train`)."""
    if "--rdzv_endpoint" not in launcher:
        launcher = ("--master_addr", "127.0.0.1", "--master_port", str(free_port()), *launcher)
    start = ([sys.executable, "-m", "powergrad", "torchrun", *launcher, "train"]
             if powergrad_launcher else
             [sys.executable, "-m", "torch.distributed.run", *launcher, *program])
    cmd = [*start, *RUN, f"log.output={tmp_path}", *extra]
    if host is not None:  # its own hostname: another "node" (a UTS namespace; root only)
        cmd = ["unshare", "-u", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd]
    return subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The 2-process run every other launch form must reproduce, through the engine with
    torch.distributed.all_reduce counted (tests/helpers_count_collectives.py)."""
    out = tmp_path_factory.mktemp("straight")
    straight = torchrun(out, program=[str(Path(__file__).parent / "helpers_count_collectives.py")])
    log, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, log[-3000:]
    counts = json.loads(log.split("collectives ")[1].splitlines()[0])
    return out / "resnet_pgt", counts


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return ckpt.load(uninterrupted_run[0] / "last.pth")


def test_two_processes_evaluate_every_test_image_once(uninterrupted_run):
    """301 test images over 2 ranks: the summed metrics equal one process evaluating the
    saved model: each test image is counted once."""
    run_dir = uninterrupted_run[0]
    final = json.loads((run_dir / "final.json").read_text())
    assert final["updates"] == 1024 // 2 // 16  # each rank takes half of the samples
    recipe = load_recipe(run_dir / "recipe.yaml")
    model = build_model(recipe.model)
    model.load_state_dict(ckpt.load(run_dir / "last.pth")["model"])
    _, eval_loader = build_fashion_mnist_loaders(DataConfig(eval_subset=301), batch_size=32,
                                                 eval_batch_size=100, seed=0, device="cpu")
    single = evaluate(model, eval_loader, torch.device("cpu"), None)
    assert abs(single["top1"] - final["final_test_top1"]) < 1e-9


def test_no_collective_on_steps_that_do_not_check_for_a_stop(uninterrupted_run):
    """Each collective is a host sync (the queue drains on a GPU): inside the epoch only the
    stop agreement every AGREE_EVERY steps, the log steps' folds (which sync anyway) and the
    epoch's own totals make one."""
    counts = uninterrupted_run[1]
    assert counts["updates"] == 32
    # 3 stop agreements, 8 log steps' folds (their non-finite check: the fold already waits
    # for the device there), the epoch's sums
    assert counts["in_epoch"] == 32 // AGREE_EVERY + 32 // 4 + 1


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


# The README's requeue line for both launch forms (its cluster section).
REQUEUE = '|| { [ $? -eq 75 ] && scontrol requeue "$SLURM_JOB_ID"; }'


def test_a_job_wide_sigusr1_requeues_by_the_readme_line_and_resumes_exactly(
        tmp_path, uninterrupted):
    """SLURM's warning (--signal=USR1@120) reaches every process of the step: the launcher
    and the workers. Plain torchrun dies of SIGUSR1 (exit 138) and would leave the workers
    unsupervised; `powergrad torchrun` passes it on, the workers stop after the same step and
    save, the launcher exits 75 and the README's line requeues. The same command then resumes
    every rank's random streams and running sums: mixup draws and weights match exactly."""
    assert REQUEUE in (Path(__file__).parent.parent / "README.md").read_text()
    command = [sys.executable, "-m", "powergrad", "torchrun", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "train", *RUN,
               f"log.output={tmp_path}"]
    # setsid: the launcher and its workers are the job step's process group; the batch shell
    # is outside it and is not signalled (SLURM's default without --signal=B:)
    script = (f'scontrol() {{ echo "$@" > "{tmp_path}/requeued"; }}\nSLURM_JOB_ID=4242\n'
              f'setsid -w {" ".join(repr(c) for c in command)} {REQUEUE}\n')
    job = subprocess.Popen(["bash", "-c", script], env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    wait_for(job, "epoch 1/1 4/32")
    step = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)
    os.killpg(int(step.stdout.split()[0]), signal.SIGUSR1)
    out, _ = job.communicate(timeout=300)
    assert "powergrad torchrun: SIGUSR1" in out and "Traceback" not in out, out[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"], out[-3000:]
    saved = ckpt.load(tmp_path / "resnet_pgt" / "last.pth")
    assert len(saved["rank_states"]) == 2
    assert saved["state"]["batch_in_epoch"] % AGREE_EVERY == 0  # the ranks agreed on a step

    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    assert_same_training(uninterrupted, ckpt.load(tmp_path / "resnet_pgt" / "last.pth"))


def test_a_killed_worker_is_restarted_by_torchrun_and_resumes_exactly(tmp_path, uninterrupted):
    """kill -9 of one worker: torchrun (--max-restarts 1) stops the other and starts both
    again; they resume from the newest step checkpoint (a dead rank 0's lock is stale and
    taken over) and end with the uninterrupted run's weights."""
    run = torchrun(tmp_path, "log.checkpoint_every=4",
                   launcher=("--nproc_per_node", "2", "--max-restarts", "1"))
    wait_for(run, "epoch 1/1 20/32")
    workers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True)
    victim = int(workers.stdout.split()[-1])
    os.kill(victim, signal.SIGKILL)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out[-3000:]
    assert "resumed from" in out and "step-0000000" in out
    assert_same_training(uninterrupted, ckpt.load(tmp_path / "resnet_pgt" / "last.pth"))


def port_from_slurm_job_id() -> tuple[int, int]:
    """(a SLURM job id, its port) such that nothing listens on the port now."""
    for job in range(os.getpid(), os.getpid() + 1000):
        port = SLURM_PORT_BASE + job % SLURM_PORT_SPAN
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return job, port
    raise RuntimeError("no free port in SLURM's range")


def test_two_tasks_with_only_slurms_variables_train_the_same_run(tmp_path, uninterrupted):
    """`srun --ntasks-per-node 2 powergrad train ...`: rank, world size and local rank from
    SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, the address from the node list and the port
    from the job id; the result is the torchrun run's, weights and random streams."""
    job, _ = port_from_slurm_job_id()
    plain = {k: v for k, v in ENV.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    tasks = [subprocess.Popen(
        [sys.executable, "-m", "powergrad", "train", *RUN, f"log.output={tmp_path}"],
        env=dict(plain, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                 SLURM_STEP_ID="0", SLURM_NNODES="1", SLURM_JOB_ID=str(job),
                 SLURM_JOB_NODELIST="localhost"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "batch: 2 process(es)" in logs[0] and logs[1].strip() == ""  # rank 1 stays quiet
    assert_same_training(uninterrupted, ckpt.load(tmp_path / "resnet_pgt" / "last.pth"))
    assert_progress_agrees_with_the_epoch_lines(logs[0])


def assert_progress_agrees_with_the_epoch_lines(log: str) -> None:
    """Each epoch's last progress line shows both processes' loss and top-1, as its epoch
    line does (not rank 0's half)."""
    epochs = re.findall(r"^epoch (\d+)/\d+: train loss (\S+) top1 (\S+) ", log, re.MULTILINE)
    assert epochs
    for epoch, loss, top1 in epochs:
        progress = re.findall(rf"^epoch {epoch}/\d+ (\d+)/(\d+) loss (\S+) top1 (\S+) \[",
                              log, re.MULTILINE)
        done, total, last_loss, last_top1 = progress[-1]
        assert (done, last_loss, last_top1) == (total, loss, top1), (epoch, progress[-1])


def two_nodes(tmp_path, *extra, max_restarts=0):
    """Two `powergrad torchrun` agents on 127.0.0.1 (the README's multi-node launch), each
    with its own hostname and one worker, joined by torchrun's c10d rendezvous. The made-up
    hostnames do not resolve, so each agent gives its address (--local_addr) as a real node's
    name would."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"two-nodes-{os.getpid()}"
    launcher = ("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", endpoint, "--rdzv_id", run_id, "--local_addr", "127.0.0.1",
                "--max-restarts", str(max_restarts))
    # Output to files: one agent blocked on a full pipe would stall the other's rendezvous.
    return [torchrun(tmp_path, *extra, launcher=launcher, host=host, powergrad_launcher=True,
                     log=open(tmp_path / f"{host}.log", "w")) for host in ("nodeA", "nodeB")]


def finish(agents, tmp_path) -> list[str]:
    """Each agent's exit code after it ends, and its output."""
    codes = [agent.wait(timeout=300) for agent in agents]
    logs = [(tmp_path / f"{host}.log").read_text() for host in ("nodeA", "nodeB")]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return logs


def test_two_torchrun_agents_as_two_nodes_train_one_run_and_survive_a_killed_worker(
        tmp_path, uninterrupted):
    """`--nnodes 2`: the agents form one 2-process job; kill -9 of the worker on one "node"
    makes both agents restart their workers (--max-restarts 1), which resume from the newest
    step checkpoint and end with the 2-process single-node run's weights."""
    agents = two_nodes(tmp_path, "log.checkpoint_every=4", max_restarts=1)
    deadline = time.time() + 240
    while not list((tmp_path / "resnet_pgt").glob("step-*.pth")):  # trained past a checkpoint
        assert time.time() < deadline and all(a.poll() is None for a in agents)
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(agents[1].pid)], capture_output=True,
                             text=True)  # unshare execs torchrun: the agent is this pid
    os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)
    assert "resumed from" in "".join(finish(agents, tmp_path))
    assert_same_training(uninterrupted, ckpt.load(tmp_path / "resnet_pgt" / "last.pth"))
