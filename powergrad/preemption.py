"""Clean preemption: SIGTERM (what torchrun, SLURM and cloud schedulers send before a kill)
asks the run to stop at the next optimizer step, save `last.pth` with its place inside the
epoch, and exit; running the same command again resumes exactly there."""
from __future__ import annotations

import signal
import threading

from .distributed import all_reduce_sum

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: neither success nor failure; run the command again


class Preempted(Exception):
    """Raised inside the training loop once a stop was requested and agreed by all ranks."""


class StopRequest:
    """Set by SIGTERM; `agreed(device)` is true on every rank once any rank received it, so
    all ranks stop after the same step (a per-step all-reduce of one number under DDP)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        return all_reduce_sum([float(self.requested)], device)[0] > 0
