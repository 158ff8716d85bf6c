"""gpu-check's engine rows under DDP: `powergrad torchrun` over every visible GPU (2 gloo
processes on the CPU) training the ResNet-50 paper recipe as a user's command does, one
subprocess per launch. The first row stops a run with SIGUSR1, resumes it with the same command
and compares it with an uninterrupted twin, and checks that its evaluation counted each
validation image once; the second trains the same steps with train.torchcompile and SyncBN.
Neither has run on a GPU yet (README, "On a GPU machine")."""
from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from powergrad.commands.gpu_context import (Context, Row, data_overrides, free_port,
                                            images_written)

ACCUM = 2  # micro-batches per optimizer step: DDP's no_sync path runs on the first of each
EPOCHS = 2
MIN_STEPS_PER_EPOCH = 2  # the stop comes after step 1 and must land in epoch 1
LAUNCH_TIMEOUT = 540  # seconds a launch may take (torch.compile included) before it fails
EXIT_GRACE = 30  # seconds a run may take to exit after its last line
COMPILE_TOLERANCE = 0.01  # compiled vs eager train loss, relative: fused kernels round apart
NOT_ON_A_GPU = "never run on a GPU before this"


class Launch:
    """`powergrad torchrun ...` in a session of its own, so a signal to its process group
    reaches the launcher (which passes it to the workers) and never gpu-check itself; its
    output read by a thread, so a run that hangs without a word is seen as one."""

    def __init__(self, command: list[str], env: dict):
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def last_line(self) -> str:
        lines = [line.strip() for line in self.lines if line.strip()]
        return lines[-1] if lines else "(no output)"

    def cause(self) -> str:
        """A failed run's own error (a worker's exception: the launcher's last line only says
        which rank failed), else its last line."""
        errors = [line.strip() for line in self.lines
                  if re.match(r"[\w.]*(Error|Exception|error):? ", line.strip())]
        return errors[-1] if errors else self.last_line()

    def wait_for(self, pattern: str, timeout: float) -> re.Match | None:
        """The first output line matching `pattern`; None once the run ended or timed out."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            lines = self.lines[:]  # a snapshot: the reader thread appends
            for line in lines[seen:]:
                if (found := re.search(pattern, line)) is not None:
                    return found
            seen = len(lines)
            if (self.proc.poll() is not None and not self.reader.is_alive()) or \
                    time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL to the launcher and everything under it: torchrun starts each worker in a
        session of its own, so the launcher's process group alone would orphan them."""
        tree = [self.proc.pid, *_descendants(self.proc.pid)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, what: str, timeout: float = LAUNCH_TIMEOUT) -> int:
        """The launcher's exit code; past `timeout`, a RuntimeError (the launcher and its
        workers killed)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.reader.join(5)
            raise RuntimeError(f"{what} had not exited {timeout:.0f} s later (killed); last "
                               f"line: {self.last_line()}") from None
        self.reader.join(5)
        return code


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # the command name, in parentheses, may hold spaces: the parent follows it
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def world_size(ctx: Context) -> int:
    """Processes per launch: every visible GPU, or 2 gloo processes on the CPU."""
    return torch.cuda.device_count() if ctx.cuda else 2


def _processes(ctx: Context, world: int) -> str:
    words = f"{'nccl' if ctx.cuda else 'gloo'}, {world} process{'es' if world > 1 else ''}"
    if world == 1:  # one process builds no process group: plain training
        words += " (one GPU: no DDP, SyncBN or no_sync; the ddp row's gloo part is the DDP check)"
    return words


def _env(ctx: Context) -> dict:
    """This checkout's powergrad first on the path (gpu-check runs from a plain checkout with
    PYTHONPATH=.); one thread per process on the CPU."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    if not ctx.cuda:
        env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return env


def _command(ctx: Context, world: int, overrides: list[str], *flags: str) -> list[str]:
    return [sys.executable, "-m", "powergrad", "torchrun", "--nproc_per_node", str(world),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "train",
            str(ctx.recipe), *overrides, *flags]


def _micro_batch(ctx: Context, root: Path, world: int) -> int:
    """The sizes' batch, or less where the synthetic set would give an epoch fewer than
    MIN_STEPS_PER_EPOCH optimizer steps."""
    images = images_written(root / "train")
    micro = min(ctx.sizes.batch, images // (world * ACCUM * MIN_STEPS_PER_EPOCH))
    if micro < 1:
        raise ValueError(f"{images} synthetic training images are too few for {world} "
                         "processes")
    return micro


def recipe_overrides(ctx: Context, root: Path, world: int) -> list[str]:
    """The paper recipe as both rows train it: its fp16 kept (on the CPU the engine's
    fit_to_machine makes it bf16 without a GradScaler), channels_last, SyncBN, checkpoints,
    ACCUM micro-batches per step, EPOCHS epochs on the synthetic folder."""
    micro = _micro_batch(ctx, root, world)
    blocks = ([f"model.kwargs.layers=[{', '.join(map(str, ctx.sizes.ddp_blocks))}]"]
              if ctx.sizes.ddp_blocks else [])
    threads = [] if ctx.cuda else ["train.threads=1"]
    return [*data_overrides(ctx, root, "torchvision"), f"train.device={ctx.device.type}",
            *threads, "train.amp_dtype=float16", "train.channels_last=true",
            "train.sync_bn=true", "log.checkpoint=true", "log.log_interval=1",
            "model.num_classes=10", *blocks,
            # zero-initialised residual branches keep a few steps' evaluation finite (the
            # engine row says why)
            "model.kwargs.zero_init_last=true",
            f"train.batch_size={micro}", f"train.global_batch={micro * ACCUM * world}",
            # the recipe's lr is for 1024 images per step: scaled linearly to this batch
            f"optim.lr={0.4 * micro * ACCUM * world / 1024:g}",
            f"train.eval_batch_size={ctx.sizes.batch}", f"train.epochs={EPOCHS}",
            "sched.warmup_epochs=1", "sched.cooldown_epochs=0"]


def _describe(ctx: Context, world: int, overrides: list[str]) -> str:
    """What the launches train, for the row's path column."""
    settings = dict(o.split("=", 1) for o in overrides)
    amp = ("fp16 + GradScaler" if ctx.cuda
           else "fp16 made bf16 by fit_to_machine on the CPU, so no GradScaler")
    net = ("ResNet-50" if not ctx.sizes.ddp_blocks
           else f"ResNet-50 with {settings['model.kwargs.layers']} blocks per stage")
    return (f"{_processes(ctx, world)}: powergrad torchrun, {net}, {amp}, channels_last, "
            f"SyncBN, {settings['train.batch_size']} x {ACCUM} accumulation (no_sync), "
            f"{ctx.sizes.res} px")


def _run(ctx: Context, command: list[str], what: str) -> Launch:
    launch = Launch(command, _env(ctx))
    code = launch.finish(what)
    if code != 0:
        raise RuntimeError(f"{what} exited {code}: {launch.cause()}")
    return launch


def _stop_after_first_step(ctx: Context, command: list[str]) -> None:
    """SIGUSR1 to the launcher's process group once rank 0 logs its first step: the workers
    agree to stop at the end of epoch 1, save, and the launcher exits 75."""
    launch = Launch(command, _env(ctx))
    if launch.wait_for(rf"^epoch 1/{EPOCHS} \d+/\d+ ", LAUNCH_TIMEOUT) is None:
        code = launch.finish("the run to stop", timeout=EXIT_GRACE)
        raise RuntimeError(f"the run to stop exited {code} before its first step: "
                           f"{launch.cause()}")
    os.killpg(launch.proc.pid, signal.SIGUSR1)
    code = launch.finish("the run stopped by SIGUSR1")
    if code != 75:
        raise RuntimeError(f"SIGUSR1 after the first step: the launcher exited {code}, not "
                           f"75: {launch.cause()}")


def _checkpoint(run_dir: Path) -> dict:
    from powergrad.training import checkpoint as ckpt

    return ckpt.load(run_dir / "last.pth")


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts' floating-point tensors
    (BatchNorm's step counters are compared by _same_tensors only)."""
    if a.keys() != b.keys():
        raise ValueError("the checkpoints hold different tensors")
    return max((x.double() - b[k].double()).abs().max().item()
               for k, x in a.items() if x.is_floating_point() and x.numel())


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, b[k]) for k, x in a.items())


def _epochs(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _one_process_evaluation(run_dir: Path) -> dict:
    """The saved weights scored by this process alone: each validation image once."""
    from powergrad.commands.validate import validate

    threads = torch.get_num_threads()
    try:
        return validate(str(run_dir), [], checkpoint="last")
    finally:
        torch.set_num_threads(threads)


def ddp_engine_row(ctx: Context, root: Path) -> Row:
    """The paper recipe for EPOCHS short epochs, once straight through (the twin), once
    stopped by SIGUSR1 after its first step and resumed by the same command.

    Pass when (1) the resumed last.pth holds the twin's tensors bit for bit, on a GPU too
    (the largest difference is shown beside how far epoch 2 moved the weights, which tells
    a resume bug from non-deterministic kernels), and (2) the run's last evaluation under
    DDP equals one process's over the validation images written: top-1 and top-5 exactly
    (counts over the images scored, so an image scored twice or skipped changes them) and
    the loss to 1e-4 relative (the two evaluations batch the images differently)."""
    world = world_size(ctx)
    overrides = recipe_overrides(ctx, root, world)
    base = ctx.workdir / "engine_ddp"
    shutil.rmtree(base, ignore_errors=True)  # a kept --workdir must not resume an old run
    twin_dir, stopped_dir = base / "twin" / ctx.recipe.stem, base / "stopped" / ctx.recipe.stem

    _run(ctx, _command(ctx, world, [*overrides, f"log.output={twin_dir.parent}"]),
         "the uninterrupted twin run")
    twin_epochs = _epochs(twin_dir)
    global_batch = int(dict(o.split("=", 1) for o in overrides)["train.global_batch"])
    ctx.eager_epoch_1 = (float(twin_epochs[0]["train_loss"]),
                         int(twin_epochs[0]["train_images"]) // global_batch)
    command = _command(ctx, world, [*overrides, f"log.output={stopped_dir.parent}"])
    _stop_after_first_step(ctx, command)
    stopped = _checkpoint(stopped_dir)
    resumed_run = _run(ctx, command, "the resumed run")
    if "resumed from" not in resumed_run.output:
        raise RuntimeError(f"the same command did not resume: {resumed_run.last_line()}")

    twin, resumed = _checkpoint(twin_dir), _checkpoint(stopped_dir)
    difference = _max_difference(twin["model"], resumed["model"])
    moved = _max_difference(twin["model"], stopped["model"])
    same_weights = (_same_tensors(twin["model"], resumed["model"])
                    and resumed["state"]["num_updates"] == twin["state"]["num_updates"])

    written = images_written(root / "val")
    last = _epochs(stopped_dir)[-1]
    ddp = {key: float(last[f"eval_{key}"]) for key in ("top1", "top5", "loss")}
    one = _one_process_evaluation(stopped_dir)
    counted_once = (one["images"] == written
                    and abs(ddp["top1"] - one["test_top1"]) < 1e-9
                    and abs(ddp["top5"] - one["test_top5"]) < 1e-9
                    and abs(ddp["loss"] - one["test_loss"]) <= 1e-4 * abs(one["test_loss"]))
    return Row("engine ddp resnet50",
               f"{_describe(ctx, world, overrides)}, {EPOCHS} epochs; SIGUSR1 after step 1, "
               f"resumed by the same command; {NOT_ON_A_GPU}",
               "pass" if same_weights and counted_once else "FAIL",
               f"stopped after step {stopped['state']['num_updates']}, exit 75; resumed to "
               f"step {resumed['state']['num_updates']}: max abs difference from the twin "
               f"{difference:.3g} over {len(twin['model'])} tensors (epoch 2 moved them up to "
               f"{moved:.3g}); evaluation over {world} process(es) top-1 {ddp['top1']:.2f} "
               f"top-5 {ddp['top5']:.2f} loss {ddp['loss']:.5f}, one process over the "
               f"{written} images written ({one['images']} scored) top-1 "
               f"{one['test_top1']:.2f} top-5 {one['test_top5']:.2f} loss "
               f"{one['test_loss']:.5f}")


def compile_row(ctx: Context, root: Path) -> Row:
    """train.torchcompile with SyncBN under DDP: the DDP row's twin's epoch-1 steps again,
    compiled (--fast-dev-run, nothing saved). Pass when its train loss is finite and, where
    the twin ran, within COMPILE_TOLERANCE of the twin's (the same images and weights)."""
    world = world_size(ctx)
    overrides = [*recipe_overrides(ctx, root, world), "train.torchcompile=true",
                 f"log.output={ctx.workdir / 'engine_compile'}"]
    eager = ctx.eager_epoch_1
    steps = eager[1] if eager else MIN_STEPS_PER_EPOCH
    start = time.perf_counter()
    launch = Launch(_command(ctx, world, overrides, "--fast-dev-run", str(steps)), _env(ctx))
    done = launch.wait_for(r"fast dev run OK: (\d+) step\(s\), train loss (\S+),",
                           LAUNCH_TIMEOUT)
    if done is None:
        code = launch.finish("the compiled run", timeout=EXIT_GRACE)
        raise RuntimeError(f"the compiled run exited {code} before its last step: "
                           f"{launch.cause()}")
    seconds = time.perf_counter() - start
    # a run that trained and then hangs on its way out is a failure of its own
    code = launch.finish(f"the compiled run, after its {done.group(1)} steps,",
                         timeout=EXIT_GRACE)
    trained, loss = int(done.group(1)), float(done.group(2))
    ok = code == 0 and trained == steps and math.isfinite(loss)
    if eager is not None:
        ok = ok and abs(loss - eager[0]) <= COMPILE_TOLERANCE * abs(eager[0])
        versus = f" (eager, the twin's epoch 1: {eager[0]:.4f})"
    else:
        versus = " (no eager twin to compare: the ddp row failed)"
    return Row("engine ddp torchcompile",
               f"{_describe(ctx, world, overrides)}, torch.compile; {NOT_ON_A_GPU}",
               "pass" if ok else "FAIL",
               f"{trained} steps, train loss {loss:.4f}{versus}, exit {code}, "
               f"{seconds:.0f} s with compilation")
