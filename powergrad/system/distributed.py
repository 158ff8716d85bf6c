"""Process-group set-up for both launch forms: torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) or SLURM's `srun` with one task per GPU (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, the job's node list). One process without either; NCCL on GPUs, gloo on the CPU
(which is how the tests exercise the same code path)."""
from __future__ import annotations

import io
import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# SLURM without MASTER_PORT: a port from the job id, so every task of one job computes the same
# one and two jobs sharing a node rarely collide (the range sits below Linux's ephemeral ports).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 17000


# Seconds between looks at the rendezvous: a stop signal is acted on within this long.
POLL_SECONDS = 0.2


class LaunchError(Exception):
    """The launcher's description of the job cannot be used: malformed or contradictory
    variables, or a rendezvous that never assembled. One line, exit 2."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this node (they share its page cache and GPUs)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _number(env, name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"{name}={value!r} is not a whole number; the launcher sets it "
                          "(torchrun or srun): do not set it by hand") from None


def in_slurm_step(env=None) -> bool:
    """Whether this process is a task of a SLURM job step (started by srun). The batch script
    (the batch step) also has SLURM_NTASKS and SLURM_PROCID=0 but no step id: there they
    describe the job's allocation, not processes that were started."""
    env = os.environ if env is None else env
    return "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)


def batch_step_note(env=None) -> str | None:
    """What to tell a user who runs `powergrad train` in a batch script of a job with several
    tasks without srun: it trains as one process."""
    env = os.environ if env is None else env
    tasks = env.get("SLURM_NTASKS", "1")
    if "WORLD_SIZE" in env or in_slurm_step(env) or tasks in ("", "1"):
        return None
    return (f"SLURM_NTASKS={tasks}, but this process is not in a job step (no srun), so it "
            f"trains as one process; to start every task: srun powergrad train ...")


def world_from_env(env=None) -> DistInfo:
    """Rank, local rank and world size as torchrun or srun set them, torchrun's names first
    (the order of timm's world_info_from_env; timm's helper is not used because it reads only
    the first of several names, says nothing of the node's process count, and counts SLURM's
    variables in a batch script, where no other task was started). LaunchError for values
    that cannot describe a job."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        info = DistInfo(_number(env, "RANK", "0"), _number(env, "LOCAL_RANK", "0"),
                        _number(env, "WORLD_SIZE"), _number(env, "LOCAL_WORLD_SIZE", "1"))
        names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    elif in_slurm_step(env):
        tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world = _number(env, tasks, "1")
        nodes = _number(env, "SLURM_STEP_NUM_NODES",
                        env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        per_node = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE", "")
                    ).split("(")[0]  # "4" or "4(x2)"
        local_world = int(per_node) if per_node.isdigit() else max(1, world // max(nodes, 1))
        info = DistInfo(_number(env, "SLURM_PROCID"), _number(env, "SLURM_LOCALID", "0"),
                        world, local_world)
        names = ("SLURM_PROCID", "SLURM_LOCALID", tasks, "SLURM_STEP_TASKS_PER_NODE")
    else:
        return DistInfo()
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise LaunchError(f"{names[0]}={info.rank} with {names[2]}={info.world_size}: a rank "
                          "must lie in [0, world size); the launcher sets both, do not set "
                          "them by hand")
    if info.local_rank < 0:
        raise LaunchError(f"{names[1]}={info.local_rank} is not a local rank")
    return info


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: 'gpu[03-04,07],cpu1' -> 'gpu03'."""
    first = re.fullmatch(r"([^,\[\]]+)(\[([0-9,\-]+)\])?(,.*)?", nodelist.strip())
    if first is None:
        raise LaunchError(f"cannot read the SLURM node list {nodelist!r}; srun sets it "
                          "(SLURM_STEP_NODELIST): do not set it by hand")
    prefix, _, ranges, _ = first.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def rendezvous_address(env=None) -> tuple[str, int]:
    """MASTER_ADDR:MASTER_PORT, or under srun alone the job's first node and a port from its
    job id: every task computes the same address without talking to the others."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get(
        "SLURM_NODELIST")
    host = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
    if host is None:
        raise LaunchError("several processes but no MASTER_ADDR and no SLURM node list: "
                          "launch with torchrun, or srun, or set MASTER_ADDR and MASTER_PORT")
    if "MASTER_PORT" in env:
        return host, _number(env, "MASTER_PORT")
    job = _number(env, "SLURM_JOB_ID", "0")
    return host, SLURM_PORT_BASE + job % SLURM_PORT_SPAN


def cuda_index(local_rank: int, visible: int) -> int | None:
    """The CUDA device of the process with this local rank: its own index when the node's GPUs
    are all visible (torchrun, srun --gpus-per-node), 0 when the launcher shows each process
    only its own GPU (srun --gpus-per-task=1); None when there are fewer GPUs than processes."""
    if local_rank < visible:
        return local_rank
    return 0 if visible == 1 else None


def process_device(kind: str, info: DistInfo, visible: int) -> torch.device:
    """The one rule for this process's device: the model, the batches, DDP's device_ids and
    the process group all take it. LaunchError when the node shows fewer GPUs than it runs
    processes (two processes on one GPU would fight over its memory, and NCCL refuses)."""
    if kind != "cuda":
        return torch.device(kind)
    index = cuda_index(info.local_rank, visible)
    if index is None:
        raise LaunchError(f"local rank {info.local_rank} of {info.local_world_size} process(es) "
                          f"on this node, but only {visible} GPU(s) are visible: start one "
                          "process per GPU (torchrun --nproc_per_node, or srun "
                          "--gpus-per-task=1)")
    return torch.device("cuda", index)


def init_distributed(device: torch.device | str, timeout: float | None = None,
                     stop=None) -> DistInfo:
    """Join the process group the launcher describes in the environment, on `device` (a CUDA
    device without an index gets this process's, by process_device). Waits at most `timeout`
    seconds for every rank (None: train.rendezvous_timeout's default; LaunchError naming the
    missing ones); a stop signal (`stop`, a preemption.StopRequest) while waiting raises
    StoppedWhileGathering at once."""
    from powergrad.config.schema import TrainConfig

    timeout = TrainConfig.rendezvous_timeout if timeout is None else timeout
    info = world_from_env()
    device = torch.device(device)
    if not info.enabled or dist.is_initialized():
        return info
    if device.type == "cuda":
        if device.index is None:
            device = process_device("cuda", info, torch.cuda.device_count())
        torch.cuda.set_device(device)
    deadline = time.monotonic() + timeout
    if "WORLD_SIZE" in os.environ:  # torchrun (or its variables set by hand)
        store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
        where = "torchrun's store"
    else:  # srun: rank 0 hosts the store at the job's first node
        host, port = rendezvous_address()
        store = _srun_store(host, port, info, deadline, stop)
        where = f"{host}:{port}"
    store = _per_attempt(store)
    _wait_for_every_rank(store, info, deadline, timeout, where, stop)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=store,
                            rank=info.rank, world_size=info.world_size,
                            device_id=device if device.type == "cuda" else None)
    return info


class StoppedWhileGathering(Exception):
    """A stop signal came while this process waited for the others: it ends at once (the
    engine decides the exit code from what the run folder holds)."""


def _stopped_while_waiting(stop) -> None:
    if stop is not None and stop.requested:
        raise StoppedWhileGathering(f"signal {stop.signum} while waiting for the other processes")


def _srun_store(host: str, port: int, info: DistInfo, deadline: float, stop):
    """Rank 0 hosts the job's store; the others connect, retrying in short slices so a stop
    signal is acted on between them (a blocked connect runs no Python signal handler)."""
    while True:
        _stopped_while_waiting(stop)
        left = deadline - time.monotonic()
        slice_s = max(0.5, min(5.0, left))
        try:
            store = dist.TCPStore(host, port, info.world_size, is_master=info.rank == 0,
                                  timeout=timedelta(seconds=slice_s), wait_for_workers=False)
            # the slice bounded the connect; gloo's and NCCL's address exchange get the whole
            store.set_timeout(timedelta(seconds=max(left, 60.0)))
            return store
        except RuntimeError as err:  # torch's DistNetworkError is one
            if info.rank == 0 or left <= slice_s:
                raise LaunchError(
                    f"rank {info.rank} could not {'open' if info.rank == 0 else 'reach'} the "
                    f"rendezvous at {host}:{port} ({' '.join(str(err).split())[:160]}); "
                    + ("another job may hold the port: set MASTER_PORT" if info.rank == 0 else
                       "rank 0 has not started, or this node cannot reach it")) from None


def _wait_for_every_rank(store, info: DistInfo, deadline: float, timeout: float, where: str,
                         stop) -> None:
    """Each rank marks its arrival in the store, then waits until all have: a rank that was
    never started is named after `timeout` s instead of a silent wait.

    A stop signal ends the wait at once, but a rank must never leave a group the others have
    seen complete (they would wait for it in init_process_group). So the group's fate is one
    atomic compare_set on a gate key: the first rank to see every arrival seals it, a rank
    told to stop before that abandons it, and every rank follows whichever came first (a stop
    after the seal is acted on by the engine's first agreement, after set-up)."""
    def key(rank: int) -> str:
        return f"powergrad/arrived/{rank}"

    gate = "powergrad/gate"
    store.set(key(info.rank), "1")
    everyone = [key(r) for r in range(info.world_size)]
    while True:
        try:
            if store.check(everyone):
                fate = store.compare_set(gate, "", "sealed")
            elif stop is not None and stop.requested:
                fate = store.compare_set(gate, "", "abandoned")
            else:
                fate = store.get(gate) if store.check([gate]) else b""
        except RuntimeError:  # torch's DistNetworkError: the store's host is gone
            raise LaunchError(f"lost the rendezvous at {where}: rank 0 stopped or failed "
                              "while the processes gathered (see its output)") from None
        if fate == b"sealed":
            return
        if fate == b"abandoned":
            if info.rank == 0:  # it hosts the store: give the others a look at the verdict
                time.sleep(5 * POLL_SECONDS)
            raise StoppedWhileGathering(
                f"signal {stop.signum} while waiting for the other processes"
                if stop is not None and stop.requested else
                "another process was stopped while the processes gathered")
        if time.monotonic() > deadline:
            missing = [r for r in range(info.world_size) if not store.check([key(r)])]
            raise LaunchError(
                f"rank(s) {_ranges(missing)} of {info.world_size} did not join within "
                f"{timeout:g} s (train.rendezvous_timeout) at {where}: they were never "
                "started (a batch script needs srun to start every task; SLURM_NTASKS or "
                "WORLD_SIZE set by hand), failed before joining (see their output), or cannot "
                "reach this address")
        time.sleep(POLL_SECONDS)


def _ranges(ranks: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    parts, start = [], None
    for i, rank in enumerate(ranks):
        if start is None:
            start = rank
        if i + 1 == len(ranks) or ranks[i + 1] != rank + 1:
            parts.append(str(start) if start == rank else f"{start}-{rank}")
            start = None
    return ", ".join(parts)


def _per_attempt(store):
    """A store whose keys no earlier torchrun attempt wrote.

    When torchrun's agent shares its own store with the workers (TORCHELASTIC_USE_AGENT_STORE,
    torch's default), that store outlives a restart (--max-restarts), yet torch 2.14's env://
    handler adds no per-attempt prefix: a restarted rank can read the previous attempt's
    gloo/NCCL address and fail to connect. With one agent its restart count names the attempt
    for every rank. With several nodes the counts disagree (a node whose workers restart for
    another node's failure does not count it), so `powergrad torchrun` turns the sharing off
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: every rendezvous round gets a new store) and plain
    torchrun gets a warning. (tests/test_distributed.py kills a worker on one node and on two.)
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store  # a new store for every attempt
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("GROUP_WORLD_SIZE", "1") == "1":
        return dist.PrefixStore(f"attempt{attempt}", store)
    if attempt != "0" and os.environ.get("RANK") == "0":
        print("warning: a multi-node torchrun restart with the agent's shared store can pick up "
              "the previous attempt's addresses and fail to connect; launch with `powergrad "
              "torchrun`, or set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", flush=True)
    return store


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over all ranks (eval counts, losses); a no-op on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_min(value: int, device) -> int:
    """The smallest of one whole number over all ranks; the number itself on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_from_main(tensors) -> None:
    """Rank 0's values into these tensors on every rank, in place; a no-op on one process."""
    if dist.is_available() and dist.is_initialized():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    # Tensors travel as torch.save bytes: all_gather_object's own pickling of tensor storages
    # does not load back on every backend.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in gathered]
