"""`powergrad torchrun [TORCHRUN OPTIONS] train RECIPE ...`: torchrun itself (its own argument
parser and launcher), with the exit codes a job script can act on.

Plain torchrun exits 1 with some 40 lines of ChildFailedError traceback whatever its workers
said, so a requeue line cannot tell a preemption (workers saved and exited 75) from a failure,
and it dies on SIGUSR1 (SLURM's usual warning signal) without telling its workers. Here:

- SIGTERM, SIGUSR1 (and torchrun's own SIGINT, SIGHUP, SIGQUIT) to the launcher are forwarded
  to the workers, which save and exit 75; the launcher then exits 75;
- workers that all exit 75 (they were signalled directly, as SLURM does) give 75;
- otherwise the first failed rank's code (2: a recipe or run-folder error, already printed
  once by rank 0; 1: diverged), with one line instead of the traceback.
"""
from __future__ import annotations

import os
import sys

from .preemption import EXIT_PREEMPTED, exit_code_unsaved

# Seconds torchrun waits for signalled workers before SIGKILL (its default is 30): a ResNet-50
# checkpoint on a busy shared file system can take longer to write. --shutdown-timeout wins.
SHUTDOWN_TIMEOUT = 300
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the powergrad command from its subcommand on)."""
    if "train" not in argv:
        raise ValueError("name the subcommand to run on every process: "
                         "powergrad torchrun [TORCHRUN OPTIONS] train RECIPE.yaml ...")
    at = argv.index("train")
    return argv[:at], argv[at:]


def exit_code(failures: dict) -> tuple[int, str]:
    """The launcher's exit code and its one line, from torchrun's {rank: ProcessFailure}: the
    first rank to fail is the cause (torchrun then signals the others)."""
    codes = {rank: failure.exitcode for rank, failure in failures.items()}
    if set(codes.values()) == {EXIT_PREEMPTED}:
        return EXIT_PREEMPTED, "preempted: every worker saved and exited 75"
    rank = min((r for r, c in codes.items() if c != EXIT_PREEMPTED),
               key=lambda r: (failures[r].timestamp, r))
    code = codes[rank]
    if code < 0:  # torchrun reports a worker killed by a signal as minus its number
        return 128 - code, f"rank {rank} was killed by signal {-code}"
    return code, f"rank {rank} exited {code} (its message is above)"


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        launcher, command = split_command(argv)
    except ValueError as err:
        print(f"powergrad torchrun: {err}", file=sys.stderr)
        return 2
    defaults = {"--signals-to-handle": SIGNALS, "--shutdown-timeout": str(SHUTDOWN_TIMEOUT)}
    for option, value in defaults.items():
        given = (option, option.replace("-", "_").replace("__", "--"))
        if not any(a.split("=")[0] in given for a in launcher):
            launcher = [option, value, *launcher]
    # Every rendezvous round a new store: torchrun's shared one outlives a restart, and with
    # several nodes no rank can tell which attempt wrote its keys (distributed._per_attempt).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = parse_args([*launcher, "-m", "powergrad", *command])
    try:
        run(args)
    except ChildFailedError as err:
        code, line = exit_code(err.failures)
        print(f"powergrad torchrun: {line}", file=sys.stderr, flush=True)
        return code
    except SignalException as err:
        # torchrun has passed the signal on and waited for its workers to save
        if not checkpoints_on(command):
            print(f"powergrad torchrun: {err.sigval.name}: nothing saved (log.checkpoint is "
                  "false)", file=sys.stderr, flush=True)
            return exit_code_unsaved(err.sigval)
        print(f"powergrad torchrun: {err.sigval.name}: forwarded to the workers, which saved; "
              "exit 75", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    return 0


def checkpoints_on(command: list[str]) -> bool:
    """Whether every recipe of `train RECIPE ... key=value` saves checkpoints (the workers'
    own exit codes are lost when torchrun is signalled, so the recipes say what they did)."""
    from .recipe import RecipeError, load_recipe
    from .train import split_items

    paths, overrides = split_items(command[1:])
    try:
        return all(load_recipe(p, overrides).log.checkpoint for p in paths)
    except RecipeError:
        return True  # the workers refused it before training and exited 2
