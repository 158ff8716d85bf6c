"""`powergrad torchrun [TORCHRUN OPTIONS] train RECIPE ...` (or `validate SOURCE ...`): torchrun
itself (its own argument parser and launcher), with the exit codes a job script can act on.

Plain torchrun exits 1 with some 40 lines of ChildFailedError traceback whatever its workers
said, so a requeue line cannot tell a preemption (workers saved and exited 75) from a failure,
and it dies on SIGUSR1 (SLURM's usual warning signal) without telling its workers. Here:

- SIGTERM, SIGUSR1, SIGUSR2 (and torchrun's own SIGINT, SIGHUP, SIGQUIT) to the launcher are
  forwarded to the workers, which save and exit 75; the launcher then exits 75;
- workers that all exit 75 (they were signalled directly, as SLURM does) give 75;
- torchrun's own options are checked before anything starts (torch asserts on some, such as
  --nproc_per_node 0, only inside its launch): a bad one is one line naming it, exit 2;
- the recipes are checked here before any worker starts: a recipe error is one line, exit 2;
- otherwise the failed rank's code (2: a run-folder error, printed by rank 0; 3: diverged;
  1: a bug), with one line instead of the traceback; torchrun failing to start or keep its
  workers (the rendezvous, a port) is one line, exit 2.

Its output is that of `powergrad train`: OMP_NUM_THREADS is set before torchrun reads it (so
no banner), and torchrun's log lines that our own lines already say (the signal it received,
the workers it closed) are filtered; its warnings about its options and its failures stay.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import signal
import sys

from powergrad.errors import one_line
from powergrad.system.exit_codes import EXIT_PREEMPTED
from powergrad.system.preemption import exit_code_unsaved

# Seconds torchrun waits for signalled workers before SIGKILL (its default is 30): a ResNet-50
# checkpoint on a busy shared file system can take longer to write. --shutdown-timeout wins.
SHUTDOWN_TIMEOUT = 300
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
# Beyond this many processes per CPU core a node only thrashes (each loads torch and a model).
PROCESSES_PER_CORE = 4
# The ways powergrad torchrun starts its workers itself: `python -u -m powergrad`.
OWN_COMMAND = {"module": "-m", "no_python": "--no-python", "run_path": "--run-path"}


# The subcommands that run on every process of a launch.
SUBCOMMANDS = ("train", "validate")


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the powergrad command from its subcommand on)."""
    at = next((i for i, arg in enumerate(argv) if arg in SUBCOMMANDS), None)
    if at is None:
        raise ValueError("name the subcommand to run on every process: powergrad torchrun "
                         "[TORCHRUN OPTIONS] train RECIPE.yaml ... (or validate SOURCE ...)")
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
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import run

    try:
        launcher, command = split_command(argv)
        args = torchrun_args(launcher, command)
    except ValueError as err:
        print(f"powergrad torchrun: {err}", file=sys.stderr)
        return 2
    recipes, refused = check_recipes(command, _world_size(args))
    if refused is not None:  # said once, here, before any worker starts
        print(refused, file=sys.stderr)
        return 2
    # after a signal torchrun returns no worker's code: the recipes say whether they saved
    validating = command[0] == "validate"
    saves = not validating and all(recipe.log.checkpoint for recipe in recipes)
    threads = worker_threads(recipes, _local_world_size(args), os.environ)
    if threads is not None:  # torchrun sets 1 itself, with a banner, when it is unset
        os.environ["OMP_NUM_THREADS"] = threads
    quiet_torchrun_logs(restarts=args.max_restarts)
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
        if not saves or not _place_saved(recipes):
            why = ("validate saves nothing" if validating else "log.checkpoint is false"
                   if not saves else "stopped before its first save")
            print(f"powergrad torchrun: {err.sigval.name}: nothing saved ({why})",
                  file=sys.stderr, flush=True)
            return exit_code_unsaved(err.sigval)
        print(f"powergrad torchrun: {err.sigval.name}: forwarded to the workers, which saved; "
              "exit 75", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except (RendezvousError, DistError, ValueError) as err:  # torchrun's own, not a worker's
        print(f"powergrad torchrun: torchrun could not start or keep its workers: "
              f"{type(err).__name__}: {one_line(err)}", file=sys.stderr, flush=True)
        return 2
    return 0


def torchrun_args(launcher: list[str], command: list[str]):
    """torchrun's options read by its own parser, with our defaults, and checked
    (launcher_problem): its namespace, or ValueError with one line naming the option."""
    from torch.distributed.run import get_args_parser

    defaults = {"--signals-to-handle": SIGNALS, "--shutdown-timeout": str(SHUTDOWN_TIMEOUT)}
    for option, value in defaults.items():
        given = (option, option.replace("-", "_").replace("__", "--"))
        if not any(a.split("=")[0] in given for a in launcher):
            launcher = [option, value, *launcher]
    parser = get_args_parser()
    parser.error = _malformed  # argparse names the option; one line, not torchrun's usage
    args = parser.parse_args([*launcher, "powergrad", *command])
    if [args.training_script, *args.training_script_args] != ["powergrad", *command]:
        # an option without its value took the subcommand, or a stray word came before it
        last = launcher[-1]
        raise ValueError(f"{last}: expected its value before the subcommand"
                         if last.startswith("-") else f"{last}: not a torchrun option or "
                         "value; torchrun's options come before the subcommand")
    problem = launcher_problem(args, launcher)
    if problem is not None:
        raise ValueError(problem)
    args.module = True  # `python -u -m powergrad train ...` on every process
    return args


def _malformed(message: str):
    """torchrun's parser refusing an option: its message, one line, exit 2."""
    print(f"powergrad torchrun: {message}; see `torchrun --help` for its options",
          file=sys.stderr)
    sys.exit(2)


def _local_world_size(args) -> int:
    """Processes per node (launcher_problem has checked that torch can tell)."""
    from torch.distributed.run import determine_local_world_size

    return determine_local_world_size(args.nproc_per_node)


def _place_saved(recipes) -> bool:
    """Whether the run a signal stopped has a checkpoint to resume from. The command's first
    recipe without a final.json is the one that was training or setting up; a signal during
    its set-up leaves nothing when it had not saved before (its workers exit 128 + N)."""
    from powergrad.training.checkpoint import training_checkpoints
    from powergrad.training.rundir import run_dir_for

    for recipe in recipes:
        run_dir = run_dir_for(recipe)
        if not (run_dir / "final.json").is_file():
            return bool(training_checkpoints(run_dir))
    return True


def _world_size(args) -> int | None:
    """Processes the launch will start, when its options say so (not for elastic ranges)."""
    from torch.distributed.run import parse_min_max_nnodes

    low, high = parse_min_max_nnodes(args.nnodes)
    return low * _local_world_size(args) if low == high else None


def check_recipes(command: list[str], world_size: int | None) -> tuple[list, str | None]:
    """(the recipes, None), or ([], the recipe error every worker would find): the checks of
    `powergrad train`, made once in the launcher, so the message is one line, not one per
    rank."""
    from powergrad.commands.arguments import parse_args
    from powergrad.commands.train import checked_recipes, split_items
    from powergrad.config.loading import RecipeError

    train_args = parse_args(command)  # argparse answers a bad option itself, exit 2
    if train_args.command == "validate":
        return [], _validate_problem(train_args)
    paths, overrides = split_items(train_args.items)
    try:
        return checked_recipes(paths, overrides, world_size or 1, train_args.fast_dev_run), None
    except RecipeError as err:
        return [], f"recipe error: {err}"


def _validate_problem(args) -> str | None:
    """validate's own checks of its source, recipe and data, made once here (every worker
    would print the same line): the line, or None."""
    from powergrad.commands.validate import ValidateError, resolve
    from powergrad.config.loading import RecipeError

    try:
        resolve(args.source, args.recipe, args.items, args.data)
    except (ValidateError, RecipeError) as err:
        return f"validate: {one_line(err)}"
    return None


def launcher_problem(args, launcher: list[str]) -> str | None:
    """One line naming the first of torchrun's options (`args`, as its parser read them) that
    cannot launch, with what it expects; None when torch can build its launch from them.
    torch checks most of these only inside its launch, by assertions or with a traceback."""
    from torch.distributed.elastic.multiprocessing.api import Std
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    def named(dest: str) -> str:  # the option as the user spelt it (torchrun takes both)
        spellings = (f"--{dest}", f"--{dest.replace('_', '-')}")
        given = {item.split("=")[0] for item in launcher}
        return next((s for s in spellings if s in given), spellings[0])

    def bad(dest: str, expected: str) -> str:
        value = getattr(args, dest)
        return f"{named(dest)} {value if str(value) else repr(value)}: {expected}"

    for dest, flag in OWN_COMMAND.items():
        if getattr(args, dest):
            return (f"{flag}: powergrad torchrun starts `python -m powergrad` on every "
                    f"process itself; leave {flag} out")
    try:
        low, high = parse_min_max_nnodes(args.nnodes)
    except (ValueError, RuntimeError):
        return bad("nnodes", "expected a node count N or a range MIN:MAX (whole numbers)")
    if not 0 < low <= high:
        return bad("nnodes", "expected whole numbers with 0 < MIN <= MAX")
    try:
        processes = determine_local_world_size(args.nproc_per_node)
    except ValueError as err:
        return bad("nproc_per_node", f"expected a whole number >= 1, or auto, gpu or cpu "
                                     f"({one_line(err)})")
    cap = PROCESSES_PER_CORE * (os.cpu_count() or 1)
    if not 1 <= processes <= cap:
        return bad("nproc_per_node", f"expected 1 to {cap} processes on this node "
                                     f"({PROCESSES_PER_CORE} per CPU core at most)")
    if args.standalone and high > 1:
        return bad("nnodes", "--standalone is one node; for several give --rdzv_backend c10d "
                             "and --rdzv_endpoint HOST:PORT instead")
    if args.max_restarts < 0:
        return bad("max_restarts", "expected a whole number >= 0")
    if not (math.isfinite(args.monitor_interval) and args.monitor_interval > 0):
        return bad("monitor_interval", "expected a number of seconds > 0")
    if args.shutdown_timeout is not None and args.shutdown_timeout < 0:
        return bad("shutdown_timeout", "expected a number of seconds >= 0")
    if not 0 <= args.node_rank < high:
        return bad("node_rank", f"expected 0 to {high - 1} (one per node of --nnodes)")
    if args.master_port is not None and not 0 <= args.master_port <= 65535:
        return bad("master_port", "expected a port number from 0 to 65535")
    backends = rendezvous_backends()
    if args.rdzv_backend not in backends:
        return bad("rdzv_backend", f"expected one of {', '.join(sorted(backends))}")
    try:
        _, port = parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=-1)
    except ValueError as err:
        return bad("rdzv_endpoint", f"expected HOST or HOST:PORT ({one_line(err)})")
    if args.rdzv_backend == "static" and args.rdzv_endpoint and port == -1:
        return bad("rdzv_endpoint", "the static rendezvous needs HOST:PORT (or give "
                                    "--master_addr and --master_port instead)")
    for dest in ("redirects", "tee"):
        try:
            Std.from_str(getattr(args, dest))
        except ValueError:
            return bad(dest, "expected 0 (none), 1 (stdout), 2 (stderr) or 3 (both), or "
                             "LOCAL_RANK:N pairs such as 0:3,1:0")
    unknown = [name for name in args.signals_to_handle.split(",")
               if name.strip() not in signal.Signals.__members__]
    if unknown:
        return bad("signals_to_handle", f"{unknown[0]!r} is not a signal name; expected names "
                                        "such as SIGTERM,SIGUSR1")
    return _torch_refuses(args)


def _torch_refuses(args) -> str | None:
    """torch's own reading of the options, made now on a copy (the rendezvous configuration,
    the log folder and filters, the redirects): its message, or None."""
    from torch.distributed.run import config_from_args

    trial = copy.copy(args)
    trial.log_dir = args.log_dir or os.devnull  # torch would make a temporary folder
    run_logger = logging.getLogger("torch.distributed.run")
    level, omp = run_logger.level, os.environ.get("OMP_NUM_THREADS")
    run_logger.setLevel(logging.ERROR)  # its warnings come once, from the real launch
    os.environ["OMP_NUM_THREADS"] = omp or "1"  # and it would set this for good
    try:
        config_from_args(trial)
    except OSError as err:  # the log folder: a file, or a place that cannot be written
        return (f"--log_dir {args.log_dir}: {err.strerror or one_line(err)}; expected a folder "
                "torchrun can make and write in")
    except (ValueError, AssertionError, RuntimeError, KeyError) as err:
        return f"torchrun refuses these options: {one_line(err)}"
    finally:
        run_logger.setLevel(level)
        if omp is None:
            del os.environ["OMP_NUM_THREADS"]
    return None


def rendezvous_backends() -> set[str]:
    """torch's own rendezvous backends and the plugins registered as torchrun handlers."""
    from importlib.metadata import entry_points

    return {"static", "c10d", "etcd", "etcd-v2"} | {
        entry.name for entry in entry_points(group="torchrun.handlers")}


def worker_threads(recipes: list, processes: int, env) -> str | None:
    """OMP_NUM_THREADS for the workers, set before torchrun reads it (torchrun then prints no
    banner): the environment's own value wins; else the recipes' train.threads when they all
    give the same; else 1 when several processes share the node (torchrun's own choice, so
    they do not oversubscribe the cores); else None (unset: torch's default)."""
    if env.get("OMP_NUM_THREADS"):
        return None
    given = {recipe.train.threads for recipe in recipes}
    if len(given) == 1 and None not in given:
        return str(given.pop())
    return "1" if processes > 1 else None


# torchrun's log lines that the launcher's own line says again (the signal, the workers
# closed), matched on the message's template: the values in it change, the words do not.
SAID_BY_US = {"Received %s death signal, shutting down workers", "Got termination signal: %s",
              "Sending process %s closing signal %s", "Closing process %s via signal %s"}
# A worker's failure: said by our one line, unless torchrun restarts the workers after it.
WORKER_FAILED = "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s"
TORCHRUN_LOGGERS = ("torch.distributed.elastic.agent.server.api",
                    "torch.distributed.elastic.multiprocessing.api")


class _SaidByUs(logging.Filter):
    def __init__(self, templates: set[str]):
        super().__init__()
        self.templates = templates

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.templates


def quiet_torchrun_logs(restarts: int) -> None:
    """Filter torchrun's log lines that our own lines repeat (once per process: a second
    launch in the same process replaces the filter)."""
    templates = SAID_BY_US | ({WORKER_FAILED} if restarts == 0 else set())
    for name in TORCHRUN_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _SaidByUs)]:
            logger.removeFilter(old)
        logger.addFilter(_SaidByUs(templates))
