"""A signal handler of the test's own, installed before a run: what the run must put back
when it ends, and a record of any signal that reached it instead of the run's handler."""
from __future__ import annotations

import contextlib
import signal

from powergrad.system.preemption import STOP_SIGNALS


@contextlib.contextmanager
def handler_before_the_run(signals=STOP_SIGNALS):
    """Yields (handler, received): `handler` is installed on `signals` (a fresh function, so
    no other code can install it by chance) and appends each signal it gets to `received`.
    The handlers found before are put back on exit."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)

    found = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield handler, received
    finally:
        for signum, previous in found.items():
            signal.signal(signum, previous)


def train_as_the_command_does(recipe, **kwargs):
    """engine.train under a StopRequest entered around it, as `powergrad train` enters one
    before its set-up: the engine handles no signal of its own."""
    from powergrad.system.preemption import StopRequest
    from powergrad.training import engine

    with StopRequest() as stop:
        return engine.train(recipe, stop=stop, **kwargs)
