"""Run as each process of a 2-process run (torchrun's variables set by the test): `powergrad
train`, with SIGUSR1 sent by rank 1 to itself as the SIGNAL_AT-th call of SIGNAL_PHASE
("evaluation" or "step") begins. Only rank 1 hears it: rank 0 must stop where they agree.
Exits with the CLI's code."""
import os
import signal
import sys

from powergrad.commands.cli import main
from powergrad.training import engine, step

PHASES = {"evaluation": (engine, "evaluate"), "step": (step, "clip_gradients")}

if os.environ.get("SIGNAL_PHASE") and os.environ["RANK"] == "1":
    owner, name = PHASES[os.environ["SIGNAL_PHASE"]]
    real, calls = getattr(owner, name), []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(os.environ["SIGNAL_AT"]):
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)

    setattr(owner, name, signalled)
raise SystemExit(main(["train", *sys.argv[1:]]))
