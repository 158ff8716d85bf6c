"""torchrun-aware process group set-up. One process without torchrun; NCCL on GPUs, gloo on
the CPU (which is how the tests exercise the same code path)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        store, _, _ = next(dist.rendezvous("env://"))
        # A torchrun restart (--max-restarts) keeps the static rendezvous's store, but torch
        # 2.14's env:// handler assumes a new store per attempt and adds no prefix: a restarted
        # rank could read the previous attempt's gloo/NCCL address (whichever rank wrote its
        # key first wins the race) and fail to connect. One prefix per attempt keeps them
        # apart (tests/test_distributed.py kills a worker and checks the restart).
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"attempt{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=info.rank,
                                world_size=world_size)
    return info


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
