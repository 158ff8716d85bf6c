"""Checkpoints written atomically and read back with weights_only=True.

A crash mid-write leaves the previous file intact: the state goes to a temporary file in the
same directory, is flushed to disk, and only then renamed over the target (os.replace is atomic
on POSIX). Everything stored is tensors and plain Python values, so weights_only loading works.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

TEMP_SUFFIX = ".tmp"
CPU = torch.device("cpu")


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as the process's umask leaves it, what open() gives any new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def save_atomic(state: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.chmod(fd, umask_mode())  # mkstemp makes 0600; colleagues on the cluster read it too
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        Path(tmp).unlink(missing_ok=True)
        why = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(
            str(err).split())
        kept = "the previous one is untouched" if path.exists() else "nothing was written"
        raise CheckpointError(f"{path}: could not write the checkpoint ({why}); {kept}. "
                              "Free space there (or choose another log.output) and run the "
                              "same command to resume") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, map_location="cpu", mmap: bool = False) -> dict:
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def rng_state(device: torch.device = CPU) -> dict:
    """This process's random streams: Python, NumPy, torch's CPU one and, for a process that
    trains on a GPU, its own device's CUDA one only (every visible device's would not restore
    where fewer are seen)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(_cuda_index(device))
    return state


def restore_rng_state(state: dict, device: torch.device = CPU) -> list[str]:
    """Put back what rng_state saved, the CUDA stream to this process's device; notes for a
    CUDA state that cannot be used here."""
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        if "cuda" in state:
            return ["the checkpoint's CUDA random state is not used on the CPU"]
        return []
    index = _cuda_index(device)
    saved, note = own_cuda_state(state.get("cuda"), index)
    if saved is not None:
        torch.cuda.set_rng_state(saved, index)
    return [note] if note else []


def own_cuda_state(saved, index: int) -> tuple[torch.Tensor | None, str | None]:
    """The saved CUDA random state for this process's device cuda:<index>, and a note when
    there is none. A tensor is the saving process's own device's state. A list is the older
    format (one state per device the saving process could see): its entry <index> is the one
    the same launch form restores, so a resume on the same machines stays exact; a device
    past its end starts from the seed."""
    if saved is None:
        return None, (f"the checkpoint holds no CUDA random state (saved on the CPU): cuda:"
                      f"{index}'s random stream starts from the seed")
    if isinstance(saved, torch.Tensor):
        return saved, None
    if index < len(saved):
        return saved[index], None
    return None, (f"the checkpoint holds CUDA random states of {len(saved)} device(s) (the "
                  f"older per-machine format) and none for cuda:{index}: its random stream "
                  "starts from the seed")


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _as_tuples(value):
    # torch.save keeps tuples, but be lenient with lists from other writers
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    return value


# --- what a checkpoint holds, and which one a run resumes from ---------------------------

TRAINING_FORMAT = "powergrad-training-v1"  # last.pth, step-*.pth: everything to continue
WEIGHTS_FORMAT = "powergrad-weights-v1"  # best.pth: weights and EMA weights only
STEP_PREFIX = "step-"


class CheckpointError(Exception):
    """A checkpoint that cannot serve: unreadable, foreign, or weights-only."""


def training_payload(*, model_state, optimizer, scheduler, scaler, ema_state, state: dict,
                     rank_states: list[dict], recipe) -> dict:
    """rank_states: one {rng, epoch_totals} per process, so every rank resumes its own
    random streams and running sums (exact DDP resume)."""
    return {"format": TRAINING_FORMAT, "model": model_state,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "ema": ema_state, "state": state,
            "rank_states": rank_states, "recipe_digest": recipe.digest(),
            "recipe_yaml": recipe.to_yaml()}


def weights_payload(training: dict) -> dict:
    keep = ("model", "ema", "state", "recipe_digest", "recipe_yaml")
    return {"format": WEIGHTS_FORMAT, **{k: training[k] for k in keep}}


def read_training(path: Path, mmap: bool = False) -> dict:
    """The payload of a training checkpoint, or a CheckpointError saying why it cannot be one.
    mmap=True maps the file instead of reading it: cheap when only the state is looked at."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = load(path, mmap=mmap)
    except Exception as err:  # truncated zip, pickle refused by weights_only, not torch at all
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}); the file is damaged or not "
                              "a checkpoint") from None
    kind = payload.get("format") if isinstance(payload, dict) else None
    if kind == WEIGHTS_FORMAT:
        raise CheckpointError(f"{path}: holds weights only (the best epoch's model and EMA), "
                              "not the optimizer and schedule a run continues from; resume "
                              "from last.pth, or load these weights with `powergrad export`")
    if kind != TRAINING_FORMAT:
        raise CheckpointError(f"{path}: not a powergrad training checkpoint (format {kind!r})")
    return payload


def progress(payload: dict) -> tuple[int, int, int]:
    """How far a training checkpoint got: (optimizer steps, finished epochs, end of epoch
    first). File times are not used: a cp or rsync resets them."""
    state = payload["state"]
    return state["num_updates"], state["epoch"], int(not state.get("batch_in_epoch"))


def _readable_checkpoints(run_dir: Path) -> tuple[list[Path], list[str]]:
    """The readable training checkpoints of a run directory, most progress first (read
    mapped, so only the state is touched), and a note for each damaged one."""
    run_dir = Path(run_dir)
    found = sorted(p for p in [run_dir / "last.pth", *run_dir.glob(f"{STEP_PREFIX}*.pth")]
                   if p.is_file())
    readable, notes = [], []
    for path in found:
        try:
            readable.append((progress(read_training(path, mmap=True)), path))
        except CheckpointError as err:
            notes.append(f"skipped {err}")
    readable.sort(key=lambda item: item[0], reverse=True)  # stable: last.pth first on a tie
    return [path for _, path in readable], notes


def training_checkpoints(run_dir: Path) -> list[Path]:
    """last.pth and the step checkpoints of a run directory that can be read, most progress
    first."""
    return _readable_checkpoints(run_dir)[0]


def remove_temp_files(run_dir: Path) -> list[str]:
    """Remove what a killed save left (.last.pth.*.tmp, .step-*.pth.*.tmp); notes saying so.
    Call only while holding the run's lock: a live save's file looks the same."""
    notes = []
    for tmp in sorted(Path(run_dir).glob(f".*.pth.*{TEMP_SUFFIX}")):
        size = tmp.stat().st_size
        tmp.unlink(missing_ok=True)
        notes.append(f"removed {tmp.name} ({size / 2**20:.1f} MiB), left by a save that was "
                     "killed")
    return notes


def choose_resume(run_dir: Path, setting: str) -> tuple[Path | None, dict | None, list[str]]:
    """(checkpoint, its payload, notes) for log.resume = auto | none | PATH.

    The run directory's own readable checkpoint with the most optimizer steps wins over a
    PATH (after a preemption the run's newer state supersedes the starting point); a damaged
    one is skipped with a note and the next is used; a run directory whose every checkpoint
    is damaged is an error, never a silent restart from scratch."""
    if setting == "none":
        return None, None, []
    readable, notes = _readable_checkpoints(run_dir)
    if readable:
        return readable[0], read_training(readable[0]), notes
    if notes:
        raise CheckpointError(f"{run_dir}: no readable checkpoint to resume from: "
                              + "; ".join(notes))
    if setting == "auto":
        return None, None, notes
    return Path(setting), read_training(Path(setting)), notes


def save_step_checkpoint(payload: dict, run_dir: Path, num_updates: int, keep: int) -> Path:
    """step-<updates>.pth, keeping only the newest `keep` of them."""
    path = Path(run_dir) / f"{STEP_PREFIX}{num_updates:09d}.pth"
    save_atomic(payload, path)
    steps = sorted(Path(run_dir).glob(f"{STEP_PREFIX}*.pth"))
    for old in steps[:-keep] if keep > 0 else steps:
        old.unlink(missing_ok=True)
    return path
