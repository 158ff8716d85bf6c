"""Process-group set-up for both launch forms: torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) or SLURM's `srun` with one task per GPU (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, the job's node list). One process without either; NCCL on GPUs, gloo on the CPU
(which is how the tests exercise the same code path)."""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

# SLURM without MASTER_PORT: a port from the job id, so every task of one job computes the same
# one and two jobs sharing a node rarely collide (the range sits below Linux's ephemeral ports).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 17000


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


def world_from_env(env=None) -> DistInfo:
    """Rank, local rank and world size as torchrun or srun set them, torchrun's names first
    (the order of timm's world_info_from_env; timm's helper is not used because it reads only
    the first of several names and says nothing of the node's process count)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistInfo(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), world,
                        int(env.get("LOCAL_WORLD_SIZE", "1")))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # "4" or "4(x2)"
        local_world = int(per_node) if per_node.isdigit() else max(1, world // max(nodes, 1))
        return DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), world,
                        local_world)
    return DistInfo()


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: 'gpu[03-04,07],cpu1' -> 'gpu03'."""
    first = re.match(r"([^,\[]+)(\[([^\]]*)\])?", nodelist.strip())
    if first is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, _, ranges = first.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def rendezvous_address(env=None) -> tuple[str, int]:
    """MASTER_ADDR:MASTER_PORT, or under srun alone the job's first node and a port from its
    job id: every task computes the same address without talking to the others."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get(
        "SLURM_NODELIST")
    host = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
    if host is None:
        raise RuntimeError("several processes but no MASTER_ADDR and no SLURM node list: "
                           "launch with torchrun, or srun, or set MASTER_ADDR and MASTER_PORT")
    if "MASTER_PORT" in env:
        return host, int(env["MASTER_PORT"])
    job = int(env.get("SLURM_JOB_ID", "0"))
    return host, SLURM_PORT_BASE + job % SLURM_PORT_SPAN


def cuda_index(local_rank: int, visible: int) -> int | None:
    """The CUDA device of the process with this local rank: its own index when the node's GPUs
    are all visible (torchrun, srun --gpus-per-node), 0 when the launcher shows each process
    only its own GPU (srun --gpus-per-task=1); None when there are fewer GPUs than processes."""
    if local_rank < visible:
        return local_rank
    return 0 if visible == 1 else None


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group the launcher describes in the environment."""
    info = world_from_env()
    if not info.enabled or dist.is_initialized():
        return info
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(cuda_index(info.local_rank, torch.cuda.device_count()))
    if "WORLD_SIZE" in os.environ:  # torchrun (or its variables set by hand)
        store, _, _ = next(dist.rendezvous("env://"))
    else:  # srun: rank 0 hosts the store at the job's first node
        host, port = rendezvous_address()
        store = dist.TCPStore(host, port, info.world_size, is_master=info.rank == 0,
                              wait_for_workers=False)
    store = _per_attempt(store)
    dist.init_process_group(backend=backend, store=store, rank=info.rank,
                            world_size=info.world_size)
    return info


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
