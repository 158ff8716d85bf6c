"""The study's runner: train every (arm, seed) a plan's claims need, once, in resumable pieces.

Each run is `powergrad train RECIPE train.seed=S log.output=RUNS/ARM log.experiment=sS` in a
subprocess, so a run that is stopped (the time budget, SIGTERM) checkpoints and resumes like
any other run, and one that fails does not take the study with it. Its outcome is its exit
code (powergrad/system/exit_codes.py): 0 finished, EXIT_DIVERGED a result to record,
EXIT_PREEMPTED stopped with a checkpoint, anything else a failure. A finished or diverged run's
record is copied to RECORDS/ARM/sS (powergrad/study/records.py). Each piece's exit code is
kept beside the run's log (sS.exit), so `--slurm --status` can name a failed run's code.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from powergrad.study.plan import Arm, Claim, StudyError, StudyPlan
from powergrad.study.records import (check_record, copy_record, read_json_record, record_dir,
                                     run_dir, run_name, run_recipe, run_settings, run_state)
from powergrad.study.status import estimate_seconds
from powergrad.system.exit_codes import EXIT_DIVERGED, EXIT_PREEMPTED
from powergrad.system.preemption import STOP_SIGNALS


def train_command(arm: Arm, seed: int, runs_root: Path, launcher: list[str] = ()) -> list[str]:
    """`powergrad train` for one run, after `launcher` (srun's words in a SLURM batch step)."""
    return [*launcher, sys.executable, "-m", "powergrad", "train", str(arm.recipe),
            *run_settings(arm, seed, runs_root)]


def shown_command(command: list[str]) -> str:
    """The command as run.json records it: `powergrad train ...`, the same under srun as
    locally, so a record does not depend on where it trained."""
    return " ".join(["powergrad", *command[command.index("powergrad") + 1:]])


def subprocess_train(command: list[str], log_file: Path, timeout: float | None) -> int:
    """Run one training command, its output to log_file. At the timeout the run is sent
    SIGTERM, and a stop signal this process gets (SIGTERM, SIGUSR1, SIGUSR2) is passed on: it
    saves its place and exits EXIT_PREEMPTED. (A run that got the signal itself too is not
    harmed: a second one changes nothing, powergrad/system/preemption.py.)"""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        stopped = []

        def stop(signum=signal.SIGTERM, _frame=None):
            stopped.append(signum)
            child.send_signal(signum)

        previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
        try:
            try:
                code = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop()
                code = child.wait()
            # Stopped before its training loop took over the signal (while starting): nothing
            # of it was lost that a re-run does not redo, so it counts as stopped too.
            return EXIT_PREEMPTED if stopped and code == -stopped[0] else code
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if child.poll() is None:  # an exception here (Ctrl-C): do not leave it running
                child.terminate()
                child.wait()


def log_tail(log_file: Path, lines: int = 3) -> str:
    """The log's last lines, for the message of a run that failed."""
    try:
        return " | ".join(log_file.read_text().strip().splitlines()[-lines:])
    except OSError:
        return ""


def _add_wall_time(log_file: Path, seconds: float) -> float:
    """The run's wall time over all the pieces it trained in (kept beside its log)."""
    path = log_file.with_suffix(".seconds")
    total = (float(path.read_text()) if path.is_file() else 0.0) + seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{total:.1f}\n")
    return round(total, 1)


def _say(message: str) -> None:
    print(message, flush=True)


def _about(seconds: float | None) -> str:
    if seconds is None:
        return "time unknown: no finished run of this arm or its cost yet"
    return f"about {seconds / 60:.1f} min"


def run_order(plan: StudyPlan, claims: list[Claim]) -> list[tuple[Arm, int]]:
    """The claims' runs seed by seed (every arm of seed 0 first, so a partial study already
    holds complete pairs)."""
    arms = plan.arms_for(claims)
    return [(arm, seed) for seed in sorted({s for a in arms for s in a.seeds})
            for arm in arms if seed in arm.seeds]


def check_runs(order: list[tuple[Arm, int]], runs_root: Path, records_root: Path) -> None:
    """Every drift found before anything trains or is submitted: a record or run folder of
    other settings than the plan's recipe now (StudyError or RunDirError, one line)."""
    from powergrad.training.rundir import check_same_recipe

    for arm, seed in order:
        check_record(arm, seed, runs_root, records_root)
        check_same_recipe(run_dir(runs_root, arm, seed), run_recipe(arm, seed, runs_root))


def record_if_finished(arm: Arm, seed: int, runs_root: Path, records_root: Path) -> str:
    """The run's state; a finished run whose record was not copied yet (stopped between its
    end and the copy) gets it now."""
    state = run_state(arm, seed, runs_root, records_root)
    if state == "done" and not (record_dir(records_root, arm, seed) / "final.json").is_file():
        copy_record(arm, seed, runs_root, records_root)
    return state


def run_study(plan: StudyPlan, claims: list[Claim], runs_root: Path, records_root: Path,
              max_minutes: float | None = None, train=subprocess_train, say=_say,
              only: tuple[Arm, int] | None = None, launcher: list[str] = ()) -> int:
    """Train what the claims need and is not finished, seed by seed (run_order); with `only`,
    that one run alone (an element of a SLURM array), its command after `launcher`. Returns 0
    when all is done, EXIT_PREEMPTED when the time budget ran out or a stop signal came (run
    again to continue), 2 for a changed recipe, 1 for a run that failed for another reason. A
    diverged run is recorded as a result and not retried."""
    from powergrad.training.rundir import RunDirError

    deadline = time.monotonic() + max_minutes * 60 if max_minutes is not None else None
    order = [only] if only else run_order(plan, claims)
    try:
        check_runs(order, runs_root, records_root)
    except (StudyError, RunDirError) as err:
        say(f"study: {err}")
        return 2
    for index, (arm, seed) in enumerate(order, 1):
        name, state = run_name(arm, seed), record_if_finished(arm, seed, runs_root, records_root)
        where = f"[{index}/{len(order)}] {name}"
        if state in ("done", "diverged"):
            say(f"{where}: {state}, skipped")
            continue
        left = deadline - time.monotonic() if deadline is not None else None
        if left is not None and left <= 0:
            say(f"study: time budget spent, {len(order) - index + 1} run(s) left; run the same "
                "command again to continue")
            return EXIT_PREEMPTED
        log_file = Path(runs_root) / arm.name / f"s{seed}.log"
        say(f"{where}: {'resuming' if state == 'partial' else 'training'} "
            f"({_about(estimate_seconds(plan, arm, records_root))}; log {log_file})")
        command = train_command(arm, seed, runs_root, launcher)
        start = time.monotonic()
        code = train(command, log_file, left)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.with_suffix(".exit").write_text(f"{code}\n")
        info = {"command": shown_command(command), "exit_code": code,
                "wall_seconds": _add_wall_time(log_file, time.monotonic() - start),
                "digest": run_recipe(arm, seed, runs_root).digest()}
        if code == 0:
            record = copy_record(arm, seed, runs_root, records_root, info)
            final = read_json_record(record / "final.json")
            say(f"{where}: test top-1 {final['final_test_top1']:.2f} %, "
                f"{info['wall_seconds']:.0f} s")
        elif code == EXIT_DIVERGED:
            copy_record(arm, seed, runs_root, records_root, {**info, "diverged": True})
            say(f"{where}: diverged (exit {code}; log {log_file}); recorded as a result")
        elif code == EXIT_PREEMPTED:
            say(f"{where}: stopped with a checkpoint (time budget or a stop signal); run the same "
                "command again to continue")
            return EXIT_PREEMPTED
        else:
            say(f"study: {name} failed with exit code {code}: {log_tail(log_file)}")
            return 2 if code == 2 else 1
    return 0
