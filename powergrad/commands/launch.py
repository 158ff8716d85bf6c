"""`powergrad torchrun [TORCHRUN OPTIONS] train RECIPE ...`: torchrun itself (its own argument
parser and launcher), with the exit codes a job script can act on.

Plain torchrun exits 1 with some 40 lines of ChildFailedError traceback whatever its workers
said, so a requeue line cannot tell a preemption (workers saved and exited 75) from a failure,
and it dies on SIGUSR1 (SLURM's usual warning signal) without telling its workers. Here:

- SIGTERM, SIGUSR1, SIGUSR2 (and torchrun's own SIGINT, SIGHUP, SIGQUIT) to the launcher are forwarded
  to the workers, which save and exit 75; the launcher then exits 75;
- workers that all exit 75 (they were signalled directly, as SLURM does) give 75;
- the recipes are checked here before any worker starts: a recipe error is one line, exit 2;
- otherwise the failed rank's code (2: a run-folder error, printed by rank 0; 3: diverged;
  1: a bug), with one line instead of the traceback.
"""
from __future__ import annotations

import os
import sys

from powergrad.system.exit_codes import EXIT_PREEMPTED
from powergrad.system.preemption import exit_code_unsaved

# Seconds torchrun waits for signalled workers before SIGKILL (its default is 30): a ResNet-50
# checkpoint on a busy shared file system can take longer to write. --shutdown-timeout wins.
SHUTDOWN_TIMEOUT = 300
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the powergrad command from its subcommand on)."""
    if "train" not in argv:
        raise ValueError("name the subcommand to run on every process: "
                         "powergrad torchrun [TORCHRUN OPTIONS] train RECIPE.yaml ...")
    at = argv.index("train")
    return argv[:at], argv[at:]


def exit_code(failures: dict) -> tuple[int, str]:
    """The launcher's exit code and its one line, from torchrun's {rank: ProcessFailure}.
    torchrun signals the other workers once one fails, so a rank that exited with a code of
    its own is the cause before one killed by a signal (the earliest, then the lowest rank)."""
    codes = {rank: failure.exitcode for rank, failure in failures.items()}
    if set(codes.values()) == {EXIT_PREEMPTED}:
        return EXIT_PREEMPTED, "preempted: every worker saved and exited 75"
    rank = min((r for r, c in codes.items() if c != EXIT_PREEMPTED),
               key=lambda r: (codes[r] < 0, failures[r].timestamp, r))
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
    args = parse_args([*launcher, "-m", "powergrad", *command])
    recipes, refused = check_recipes(command, _world_size(args))
    if refused is not None:  # said once, here, before any worker starts
        print(refused, file=sys.stderr)
        return 2
    # after a signal torchrun returns no worker's code: the recipes say whether they saved
    saves = all(recipe.log.checkpoint for recipe in recipes)
    # Every rendezvous round a new store: torchrun's shared one outlives a restart, and with
    # several nodes no rank can tell which attempt wrote its keys (distributed._per_attempt).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(args)
    except ChildFailedError as err:
        code, line = exit_code(err.failures)
        print(f"powergrad torchrun: {line}", file=sys.stderr, flush=True)
        return code
    except SignalException as err:
        # torchrun has passed the signal on and waited for its workers to save
        if not saves:
            print(f"powergrad torchrun: {err.sigval.name}: nothing saved (log.checkpoint is "
                  "false)", file=sys.stderr, flush=True)
            return exit_code_unsaved(err.sigval)
        print(f"powergrad torchrun: {err.sigval.name}: forwarded to the workers, which saved; "
              "exit 75", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    return 0


def _world_size(args) -> int | None:
    """Processes the launch will start, when its options say so (not for elastic ranges)."""
    nodes, per_node = str(args.nnodes), str(args.nproc_per_node)
    return int(nodes) * int(per_node) if nodes.isdigit() and per_node.isdigit() else None


def check_recipes(command: list[str], world_size: int | None) -> tuple[list, str | None]:
    """(the recipes, None), or ([], the recipe error every worker would find): the checks of
    `powergrad train`, made once in the launcher, so the message is one line, not one per
    rank."""
    from powergrad.commands.arguments import parse_args
    from powergrad.commands.train import checked_recipes, split_items
    from powergrad.config.loading import RecipeError

    train_args = parse_args(command)  # argparse answers a bad option itself, exit 2
    paths, overrides = split_items(train_args.items)
    try:
        return checked_recipes(paths, overrides, world_size or 1, train_args.fast_dev_run), None
    except RecipeError as err:
        return [], f"recipe error: {err}"
