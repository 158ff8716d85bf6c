"""What schedulers do to a run: signals to every process of the job, SLURM's variables, a
requeue on another node, checkpoints copied around. Each behaviour is run as a user's command
would run it (a subprocess, often under torchrun); tests/test_distributed.py holds the runs that
are compared with an uninterrupted one."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers_images import imagenet_format
from helpers_net import free_port
from helpers_signals import handler_before_the_run, train_as_the_command_does

from powergrad.commands.launch import exit_code
from powergrad.config.loading import load_recipe
from powergrad.system.distributed import (SLURM_PORT_BASE, SLURM_PORT_SPAN, first_host,
                                          rendezvous_address, world_from_env)
from powergrad.system.preemption import Preempted
from powergrad.training import checkpoint as ckpt
from powergrad.training import engine, step
from powergrad.training.rundir import LOCK_NAME, RunDirError, RunLock

REPO = Path(__file__).resolve().parent.parent
FASHION = REPO / "recipes" / "fashion_mnist" / "resnet_pgt.yaml"
SMALL = ["model.kwargs.channels=[8, 16, 32, 64]", "data.eval_subset=100",
         "train.batch_size=16", "train.epochs=1", "train.threads=1", "train.channels_last=false",
         "log.log_interval=4"]
TINY = ["model.kwargs.channels=[8, 8, 16, 16]", "data.train_subset=256", "data.eval_subset=64",
        "train.batch_size=32", "train.eval_batch_size=64", "train.epochs=2",
        "train.channels_last=false", "train.threads=1", "log.log_interval=100"]

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start(args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=kwargs.pop("env", ENV), **kwargs)


def read_until(proc: subprocess.Popen, text: str, seconds: float = 240) -> str:
    """Read the process's output lines until one holds `text`; what was read."""
    deadline, seen = time.time() + seconds, []
    while True:
        line = proc.stdout.readline()
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.time() < deadline and (line or proc.poll() is None), "".join(seen)[-3000:]


def powergrad(*args) -> list[str]:
    return [sys.executable, "-m", "powergrad", *args]


# --- preemption as schedulers deliver it ---------------------------------------------------

@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    return imagenet_format(tmp_path_factory.mktemp("imagenet_format"), 24, 4)


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_twice_to_the_process_group_with_loader_workers_exits_75_and_resumes(
        imagenet_folder, tmp_path):
    """SLURM and `kill -- -PGID` signal the DataLoader workers too, and may signal twice: the
    workers ignore it, the main process saves after the step and exits 75, and the same
    command finishes the run from that step."""
    root = imagenet_folder
    args = powergrad(
        "train", str(REPO / "recipes/imagenet/resnet18_cosine_baseline.yaml"),
        f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}",
        "data.loader=torchvision", "data.workers=2", "data.img_size=32", "data.val_img_size=32",
        "model.num_classes=3", "data.num_classes=3", "train.global_batch=4", "train.batch_size=4",
        "train.threads=1", "train.amp_dtype=bfloat16", "train.eval_batch_size=4",
        "log.log_interval=1", "train.epochs=1", "sched.warmup_epochs=0", "sched.cooldown_epochs=0",
        f"log.output={tmp_path}")
    proc = start(args, start_new_session=True)  # its own process group, as a job step has
    read_until(proc, "epoch 1/1 6/18")
    os.killpg(proc.pid, signal.SIGTERM)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert "preempted: saved" in out and "Traceback" not in out
    saved = ckpt.read_training(tmp_path / "resnet18_cosine_baseline" / "last.pth")["state"]
    assert 6 <= saved["batch_in_epoch"] < 18

    done = subprocess.run(args, capture_output=True, text=True, timeout=240, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"batch {saved['batch_in_epoch']}" in done.stdout and "epoch 1/1:" in done.stdout
    final = json.loads((tmp_path / "resnet18_cosine_baseline" / "final.json").read_text())
    assert final["updates"] == 18


def signalled_at_step(monkeypatch, signum: int, at: int) -> None:
    """The signal arrives while the optimizer step `at` is being taken."""
    real_clip, steps = step.clip_gradients, []

    def clip_and_signal(*args, **kwargs):
        steps.append(1)
        if len(steps) == at:
            os.kill(os.getpid(), signum)
        return real_clip(*args, **kwargs)
    monkeypatch.setattr(step, "clip_gradients", clip_and_signal)


@pytest.fixture
def handler_before():
    """(handler, received): the test's own handler on SIGTERM and SIGUSR1 before the run; a
    stop leaves both ignored until the process exits, so the ones found are put back after."""
    with handler_before_the_run() as installed:
        yield installed


def test_sigusr1_preempts_like_sigterm(tmp_path, monkeypatch, handler_before):
    """SLURM's early warning, --signal=USR1@120. The run's handler takes it (not the one
    installed before the run), and after the stop both signals are ignored: neither the
    handler from before nor the default action (death) sees a second one."""
    before, received = handler_before
    signalled_at_step(monkeypatch, signal.SIGUSR1, 3)
    with pytest.raises(Preempted) as stop:
        train_as_the_command_does(load_recipe(FASHION, TINY + [f"log.output={tmp_path}"]))
    assert stop.value.exit_code == 75 and "preempted: saved" in str(stop.value)
    assert ckpt.read_training(tmp_path / "resnet_pgt" / "last.pth")["state"]["num_updates"] == 3
    assert received == []
    assert [signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)] == [
        signal.SIG_IGN, signal.SIG_IGN]
    os.kill(os.getpid(), signal.SIGUSR1)  # a second one changes nothing
    assert received == []


def test_without_checkpoints_a_preemption_says_nothing_was_saved_and_is_not_75(
        tmp_path, monkeypatch, handler_before):
    signalled_at_step(monkeypatch, signal.SIGTERM, 3)
    with pytest.raises(Preempted) as stop:
        train_as_the_command_does(load_recipe(FASHION, TINY + ["log.checkpoint=false",
                                                  f"log.output={tmp_path}"]))
    assert handler_before[1] == []  # the run's handler took the signal
    assert stop.value.exit_code == 143  # 128 + SIGTERM, as a shell reports it: no requeue
    assert "nothing saved (log.checkpoint is false)" in str(stop.value)
    assert not list(tmp_path.rglob("*.pth"))


@pytest.mark.subprocess
def test_a_recipe_error_under_torchrun_is_one_line_and_its_exit_code(tmp_path):
    """Under plain torchrun rank 0 alone prints it (train.main); a worker's later failure is
    named by `powergrad torchrun` in one line (test_the_launchers_exit_code_reads_...)."""
    done = subprocess.run(
        powergrad("torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                  "--master_port", str(free_port()), "train", str(FASHION), "optim.lrr=0.1",
                  f"log.output={tmp_path}"), capture_output=True, text=True, timeout=120,
        env=ENV)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "optim.lrr: unknown key" in line]
    assert len(errors) == 1, done.stderr  # the launcher checks the recipes once
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert "local_rank" not in done.stderr  # before any worker started


def test_the_launchers_exit_code_reads_the_workers_codes():
    class Failure:
        def __init__(self, code, timestamp=0):
            self.exitcode, self.timestamp = code, timestamp
    assert exit_code({0: Failure(75), 1: Failure(75)})[0] == 75
    assert exit_code({0: Failure(75), 1: Failure(2)}) == (2, "rank 1 exited 2 (its message is "
                                                              "above)")
    assert exit_code({1: Failure(-9)})[0] == 137  # killed by SIGKILL, as a shell reports it
    # rank 1 failed; torchrun then stopped rank 0 with SIGTERM (seen in the same second)
    assert exit_code({0: Failure(-15), 1: Failure(2)})[0] == 2
    assert exit_code({0: Failure(1, timestamp=11), 1: Failure(2, timestamp=10)})[0] == 2


# --- SLURM's variables -----------------------------------------------------------------------

def test_slurm_node_lists_give_their_first_host():
    assert first_host("gpu[03-04,07],cpu1") == "gpu03"
    assert first_host("node7") == "node7"
    assert first_host("a-b[001-004]") == "a-b001"
    assert first_host("x[2,5-6]") == "x2"


def test_torchrun_variables_win_over_slurms_and_srun_alone_is_read():
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_STEP_ID": "0", "SLURM_NNODES": "2", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "gpu[09-10]"}
    info = world_from_env(slurm)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert rendezvous_address(slurm) == ("gpu09",
                                         SLURM_PORT_BASE + 123456 % SLURM_PORT_SPAN)
    assert rendezvous_address({**slurm, "MASTER_ADDR": "h", "MASTER_PORT": "7"}) == ("h", 7)
    torchrun = {**slurm, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "2"}
    info = world_from_env(torchrun)
    assert (info.rank, info.world_size, info.local_world_size) == (0, 2, 2)
    assert not world_from_env({}).enabled


# --- the run lock across hosts -----------------------------------------------------------------

def on_host(host: str, args: list[str]) -> list[str]:
    """The command in a process with its own hostname (a UTS namespace: root only)."""
    return ["unshare", "-u", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *args]


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_run_killed_on_one_host_is_resumed_from_another_once_its_heartbeat_is_stale(tmp_path):
    args = powergrad("train", str(FASHION), *SMALL, "data.train_subset=8192",
                     "log.checkpoint_every=20", "log.lock_stale_after=2",
                     f"log.output={tmp_path}")
    # (a live lock refused from another host: test_a_heartbeat_keeps_a_lock_live_past_...)
    run_a = start(on_host("nodeA", args))
    read_until(run_a, "epoch 1/1 24/512")
    run_a.kill()  # -9: no chance to remove its lock
    run_a.communicate()
    assert json.loads((tmp_path / "resnet_pgt" / LOCK_NAME).read_text())["host"] == "nodeA"
    time.sleep(3)  # past log.lock_stale_after
    run_b = start(on_host("nodeB", args))
    out = read_until(run_b, "resumed from")
    assert "taking over the stale lock" in out and "'host': 'nodeA'" in out, out
    assert json.loads((tmp_path / "resnet_pgt" / LOCK_NAME).read_text())["host"] == "nodeB"
    run_b.send_signal(signal.SIGTERM)  # no need to train the rest
    out, _ = run_b.communicate(timeout=120)
    assert run_b.returncode == 75, out[-2000:]
    assert not (tmp_path / "resnet_pgt" / LOCK_NAME).exists()


def test_a_heartbeat_keeps_a_lock_live_past_its_stale_time(tmp_path, monkeypatch):
    """The holder's thread rewrites the heartbeat (every stale_after / 4 s). Another host's
    process then checks the lock with a clock of the test's, the holder's thread keeping the
    real one: at a time past the stale time of the lock's first heartbeat but within that of
    the newest it is refused; past the newest's it is taken over (so the check does read
    that clock). No real interval has to win a race: the only wait is for the rewritten
    heartbeat, with a guard against a hang."""
    from types import SimpleNamespace

    from powergrad.training import rundir

    lock_file = tmp_path / LOCK_NAME

    def heartbeat() -> float:
        return json.loads(lock_file.read_text())["heartbeat"]

    clock = {}

    def checkers_time() -> float:  # the holder's heartbeat thread writes real times
        beating = threading.current_thread().name == "run.lock heartbeat"
        return time.time() if beating else clock["now"]

    with RunLock(tmp_path, stale_after=2.0):
        first, deadline = heartbeat(), time.monotonic() + 60
        while (newest := heartbeat()) == first:
            assert time.monotonic() < deadline, "the heartbeat was never rewritten"
            time.sleep(0.05)
        monkeypatch.setattr(rundir, "time", SimpleNamespace(time=checkers_time,
                                                            strftime=time.strftime))
        monkeypatch.setattr(socket, "gethostname", lambda: "another-node")
        clock["now"] = newest + 2.0 - (newest - first) / 2  # > first + 2, < newest + 2
        with pytest.raises(RunDirError, match="in use by process"):
            RunLock(tmp_path, stale_after=2.0).__enter__()
        clock["now"] = time.time() + 3.0  # later than any heartbeat can be, plus 3 s
        taker = RunLock(tmp_path, stale_after=2.0).__enter__()
        assert json.loads(lock_file.read_text())["token"] == taker.token
        taker.__exit__(None, None, None)
        monkeypatch.undo()
    assert not lock_file.exists()


def test_a_lock_that_is_not_a_whole_lock_is_stale(tmp_path, capsys):
    (tmp_path / LOCK_NAME).write_text('{"pid": 12')  # what no powergrad ever writes
    with RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    assert "taking over the stale lock" in capsys.readouterr().out


# --- checkpoints: chosen by progress, temp files, modes ----------------------------------------


def test_the_checkpoint_with_most_steps_wins_whatever_its_file_time(tmp_path, capsys):
    recipe = load_recipe(FASHION, TINY + ["log.checkpoint_every=3", f"log.output={tmp_path}"])
    summary = engine.train(recipe)
    run_dir = Path(summary["run_dir"])
    last = ckpt.read_training(run_dir / "last.pth")
    steps = sorted(run_dir.glob("step-*.pth"))
    assert steps and all(ckpt.read_training(p)["state"]["num_updates"] < last["state"]["num_updates"]
                         for p in steps)
    for path in steps:  # as after `cp` or `rsync` without -t: the older state looks newer
        os.utime(path, (time.time() + 3600, time.time() + 3600))
    assert ckpt.training_checkpoints(run_dir)[0] == run_dir / "last.pth"
    # a save killed mid-write leaves its temporary file; the next start removes it
    (run_dir / ".step-000000099.pth.abc123.tmp").write_bytes(b"\0" * 4096)
    capsys.readouterr()
    engine.train(recipe)
    assert "removed .step-000000099.pth.abc123.tmp" in capsys.readouterr().out
    assert not list(run_dir.glob(".*.tmp"))


def test_checkpoints_and_exports_follow_the_umask(tmp_path):
    from powergrad.commands.export import export_run

    old = os.umask(0o022)
    try:
        summary = engine.train(load_recipe(FASHION, TINY + ["train.epochs=1",
                                                            f"log.output={tmp_path}"]))
        run_dir = Path(summary["run_dir"])
        export_run(run_dir)
    finally:
        os.umask(old)
    for path in [run_dir / "last.pth", run_dir / "best.pth", run_dir / "export/model.safetensors",
                 run_dir / "export/config.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# --- gpu-check from a plain checkout, without the extras ----------------------------------------

@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.cluster
def test_gpu_check_runs_from_a_plain_checkout_without_the_extras(tmp_path):
    """What a GPU machine runs first: PYTHONPATH=. on a Python that lacks ffcv, DALI, scipy and
    torchcodec. The extras are hidden from this venv's Python by a meta-path finder (a real
    second venv would cost a 5.6 GB torch install per test run)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    names = ('ffcv', 'nvidia', 'scipy', 'torchcodec')\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    out = tmp_path / "out"
    env = dict(ENV, PYTHONPATH=f"{hide}{os.pathsep}.")
    done = subprocess.run([sys.executable, "-m", "powergrad", "gpu-check", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["check"]: row for row in json.loads((out / "gpu_check.json").read_text())["rows"]}
    assert list(rows) == ["pgt fp16 + GradScaler", "pgt bf16", "engine resnet50", "loader ffcv",
                          "loader dali", "loader torchvision", "ddp", "engine ddp resnet50",
                          "engine ddp torchcompile", "gpu-hours"]
    assert rows["loader ffcv"]["result"] == "skipped: ffcv not installed"
    assert rows["loader dali"]["result"] == "skipped: nvidia-dali not installed"
    for name in ("pgt fp16 + GradScaler", "pgt bf16", "engine resnet50", "loader torchvision",
                 "ddp", "engine ddp resnet50", "engine ddp torchcompile"):
        assert rows[name]["result"] == "pass", rows[name]
    assert "worst relative error" in rows["pgt fp16 + GradScaler"]["numbers"]
    assert "2 steps, train loss" in rows["engine resnet50"]["numbers"]
    assert "feed ratio" in rows["loader torchvision"]["numbers"]
    # 2 gloo processes' averaged gradient against one process's whole batch: rounding only
    assert rows["ddp"]["path"].startswith("gloo, 2 processes")
    assert float(re.search(r"relative error (\S+) \(limit", rows["ddp"]["numbers"]).group(1)) \
        < 1e-5
    # the engine under `powergrad torchrun`, 2 gloo processes: stopped by SIGUSR1, resumed to
    # the uninterrupted twin's weights bit for bit, every validation image scored once
    engine = rows["engine ddp resnet50"]
    assert engine["path"].startswith("gloo, 2 processes: powergrad torchrun")
    assert "never run on a GPU" in engine["path"] and "SyncBN" in engine["path"]
    stopped, resumed = map(int, re.search(r"stopped after step (\d+), exit 75; resumed to step "
                                          r"(\d+)", engine["numbers"]).groups())
    assert 0 < stopped < resumed
    assert float(re.search(r"max abs difference from the twin (\S+) over",
                           engine["numbers"]).group(1)) == 0
    assert float(re.search(r"epoch 2 moved them up to ([^)]+)\)",
                           engine["numbers"]).group(1)) > 0  # the resumed epoch trained
    evaluation = re.search(
        r"evaluation over 2 process\(es\) top-1 (\S+) top-5 (\S+) loss (\S+), one process "
        r"over the (\d+) images written \((\d+) scored\) top-1 (\S+) top-5 (\S+) loss (\S+)$",
        engine["numbers"]).groups()
    written, scored = int(evaluation[3]), int(evaluation[4])
    assert written % 2 == 1 and scored == written  # odd: uneven shares for 2 processes
    assert evaluation[:2] == evaluation[5:7]
    assert abs(float(evaluation[2]) - float(evaluation[7])) <= 1e-4 * float(evaluation[7])
    # the same steps compiled, with SyncBN under DDP: the eager twin's loss, and an exit
    compiled = rows["engine ddp torchcompile"]
    assert "torch.compile" in compiled["path"] and "never run on a GPU" in compiled["path"]
    loss, eager = map(float, re.search(r"train loss (\S+) \(eager, the twin's epoch 1: "
                                       r"([^)]+)\), exit 0,", compiled["numbers"]).groups())
    assert abs(loss - eager) <= 0.01 * eager
    # the step code of the GPU-hours row ran; only its extrapolation needs a GPU
    assert rows["gpu-hours"]["result"] == "skipped: no CUDA device"
    assert "s per step" in rows["gpu-hours"]["numbers"]
    table = (out / "gpu_check.md").read_text()
    assert table == done.stdout[done.stdout.index("powergrad gpu-check"):]  # what it printed
    assert table.count("\n| ") == len(rows) + 1 and "all checks passed" in table


# --- train.sync_bn -----------------------------------------------------------------------------

def small_bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2)).double()


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64) * 3 + 1
            for _ in range(2)]


def sync_bn_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from powergrad.training.sync_batchnorm import convert_to_sync_bn

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    net = convert_to_sync_bn(small_bn_net(), torch.device("cpu"))
    for x in batches():  # two steps: the running statistics accumulate
        share = x.chunk(world)[rank]
        net(share).square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    for g in grads:  # DDP's averaging of the per-rank gradients
        dist.all_reduce(g)
        g /= world
    if rank == 0:
        torch.save({"buffers": dict(net.named_buffers()), "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.subprocess
def test_sync_bn_over_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    """2 gloo processes with half the batch each, against plain BatchNorm on the whole batch
    in one process, in float64: running mean and variance, and the averaged gradients."""
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    mp.spawn(sync_bn_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    synced = torch.load(out, weights_only=True)
    whole = small_bn_net()
    for x in batches():
        whole(x).square().mean().backward()
    for name, value in whole.named_buffers():
        torch.testing.assert_close(synced["buffers"][name], value, rtol=1e-12, atol=1e-12,
                                   msg=name)
    for got, want in zip(synced["grads"], [p.grad for p in whole.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not torch.equal(whole[1].running_var, small_bn_net()[1].running_var)  # it moved


def test_an_epoch_finished_after_a_requeue_reports_its_own_rate_and_the_whole_time(
        tmp_path, monkeypatch, handler_before, capsys):
    """Preempted at the last step of epoch 1 (8 steps an epoch): the requeued run trains no
    image of that epoch, so its line shows '-' for the rate, not 0 img/s; the epoch's seconds
    and images are the first allocation's, carried in the checkpoint, and the run's time is
    the sum over its allocations."""
    import csv

    signalled_at_step(monkeypatch, signal.SIGUSR1, 8)
    recipe = load_recipe(FASHION, TINY + [f"log.output={tmp_path}"])
    with pytest.raises(Preempted):
        train_as_the_command_does(recipe)
    saved = ckpt.read_training(tmp_path / "resnet_pgt" / "last.pth")
    assert saved["state"]["batch_in_epoch"] == 8
    first_allocation = saved["rank_states"][0]["epoch_totals"]["seconds"]
    assert first_allocation > 0
    capsys.readouterr()
    summary = engine.train(recipe)
    out = capsys.readouterr().out
    assert "epoch 1/2:" in out and "| - img/s (trained before the requeue)" in out
    assert " 0 img/s" not in out
    with open(tmp_path / "resnet_pgt" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["epoch_seconds"]) >= first_allocation
    assert int(rows[0]["train_images"]) == 256 and int(rows[1]["train_images"]) == 256
    assert summary["train_seconds"] == pytest.approx(
        float(rows[0]["epoch_seconds"]) + float(rows[1]["epoch_seconds"]), rel=1e-6)
    assert summary["img_per_sec"] == pytest.approx(512 / summary["train_seconds"], rel=1e-6)
