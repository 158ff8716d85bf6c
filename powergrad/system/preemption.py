"""Clean preemption. SIGTERM (what SLURM, torchrun, systemd and cloud schedulers send before a
kill), SIGUSR1 (SLURM's usual early warning, `--signal=USR1@120`) or SIGUSR2 (submitit's, which
moved off SIGUSR1 when NCCL 2.12 took that one for its own debugging) asks the run to stop after
an optimizer step that every rank agrees on, save `last.pth` with its place inside the epoch,
and exit 75; running the same command again resumes exactly there. Before the first step (the
processes still gathering, the data still loading) the run ends at once instead.

Schedulers signal every process of the job, data-loader workers included: workers ignore both
signals (`ignore_in_worker`), the main process saves and then shuts them down. A second signal
while the first is handled changes nothing.
"""
from __future__ import annotations

import atexit
import signal
import threading

from powergrad.system.exit_codes import EXIT_PREEMPTED

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Under DDP the ranks agree on a stop every this many optimizer steps (one all-reduce of one
# number, a host sync): a run trains at most this many steps past the signal. One process
# reads its own flag at every step, which costs nothing.
AGREE_EVERY = 10


def exit_code_unsaved(signum: int) -> int:
    """Stopped by a signal with nothing saved (log.checkpoint: false): the shell's code for
    "killed by signal N" (143 for SIGTERM, 138 for SIGUSR1, 140 for SIGUSR2), never 75, so a requeue loop that
    resumes on 75 does not restart this run from scratch forever."""
    return 128 + signum


class Preempted(Exception):
    """Raised inside the training loop once a stop was requested and agreed by all ranks;
    `exit_code` is what the command exits with."""

    def __init__(self, message: str = "", exit_code: int = EXIT_PREEMPTED):
        super().__init__(message)
        self.exit_code = exit_code


def ignore_in_worker(_worker_id: int | None = None) -> None:
    """A DataLoader worker_init_fn: the stop signals are the main process's to handle."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def end_workers_at_exit() -> None:
    """Make sure this process's daemonic children (DataLoader workers) end when it exits.

    Python's exit ends daemonic children with SIGTERM, then waits for them; workers that
    ignore it (ignore_in_worker) and whose loader was never shut down (a dev run leaves its
    iterator mid-epoch; a compiled model's caches can keep it alive) are waited for forever:
    a compiled SyncBN run under torchrun hung after its last line. This hook, registered
    after multiprocessing's own (atexit runs last-in first), kills them first."""
    if not _EXIT_HOOK:
        atexit.register(_kill_daemonic_children)
        _EXIT_HOOK.append(_kill_daemonic_children)


_EXIT_HOOK: list = []


def _kill_daemonic_children() -> None:
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class StopRequest:
    """Set by SIGTERM, SIGUSR1 or SIGUSR2 in the main thread. `should_stop(num_updates, device)` is true
    on every rank at the same optimizer step once any rank received a signal."""

    def __init__(self, world_size: int | None = None):
        """world_size None: the launcher's, read when first needed. This module imports no
        torch, so the CLI can catch signals before its slow imports."""
        self.signum: int | None = None
        self._world_size = world_size
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            # After a stop, further signals (SLURM and torchrun both send one) must not kill
            # the process between its save and its exit.
            signal.signal(signum, signal.SIG_IGN if self.requested else previous)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    @property
    def world_size(self) -> int:
        if self._world_size is None:
            from powergrad.system.distributed import world_from_env
            self._world_size = world_from_env().world_size
        return self._world_size

    def should_stop(self, count: int, device) -> bool:
        """count: optimizer steps (or evaluation batches) so far, the same on every rank; the
        ranks agree when it is a multiple of AGREE_EVERY."""
        if self.world_size == 1:
            return self.requested
        if count % AGREE_EVERY:
            return False
        return self.agreed(device)

    def agreed(self, device) -> bool:
        """Whether any rank received a signal: a collective, so every rank must call it."""
        if self.world_size == 1:
            return self.requested
        from powergrad.system.distributed import all_reduce_sum
        return all_reduce_sum([float(self.requested)], device)[0] > 0
