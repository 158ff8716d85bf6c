"""`powergrad study PLAN --slurm`: a plan's runs as one SLURM job array, submitted by sbatch.

Every (arm, seed) not recorded, not training (its run.lock live) and not already queued by an
array of this study becomes one element. The array script, RUNS/slurm/array-N.sh, stays beside
the runs to be read and resubmitted: element K runs `powergrad study PLAN --only ARM:SEED`,
which trains that one run as a step of the element's job (`srun --kill-on-bad-exit=1 powergrad
train ...`, the README's srun form) and copies its record, as a local study does. The array
asks for `--signal=USR1@120 --requeue`: the warning reaches the step, the run saves and exits
75, and the script's requeue line (the README's) puts the element back in the queue, where it
resumes from its checkpoint. RUNS/slurm/jobs.txt lists the arrays submitted (job id, script).

Each run's state for `--slurm --status` comes from its record, squeue (elements of the arrays
whose script is in RUNS/slurm, resubmitted by hand too), its run.lock, the exit code its last
piece left beside its log (sS.exit), and sacct where the cluster keeps accounting.
"""
from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from powergrad.study.plan import Arm, Claim, StudyError, StudyPlan
from powergrad.study.records import run_dir, run_name, run_recipe, run_state
from powergrad.study.runner import check_runs, record_if_finished, run_order
from powergrad.system.exit_codes import EXIT_PREEMPTED

SRUN = ["srun", "--kill-on-bad-exit=1"]  # the README's srun form
WARNING = "--signal=USR1@120"  # the README's: two minutes to save before the time limit
REQUEUE_LINE = '|| { [ $? -eq 75 ] && scontrol requeue "$SLURM_JOB_ID"; }'
# squeue's fields: array job id, element index, state, reason, batch script (a full path)
SQUEUE_FORMAT = "%F|%K|%T|%r|%o"
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT"}
FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "BOOT_FAIL",
          "DEADLINE", "PREEMPTED"}
STATES = ("recorded", "running", "pending", "failed", "stopped", "not submitted")
INSTALL = ("--slurm submits through SLURM's own commands: run it on a login node of the "
           "cluster, or install SLURM's client (Debian: apt-get install slurm-client)")


def slurm_folder(runs_root: Path) -> Path:
    return Path(runs_root) / "slurm"


def parse_only(plan: StudyPlan, text: str) -> tuple[Arm, int]:
    """--only ARM:SEED, an arm of the plan and one of its seeds."""
    name, _, seed = text.rpartition(":")
    if name not in plan.arms or not seed.isdigit() or int(seed) not in plan.arms[name].seeds:
        runs = ", ".join(f"{a.name}:{s}" for a in plan.arms.values() for s in a.seeds)
        raise StudyError("--only", "", f"got {text!r}; expected ARM:SEED, one of: {runs}")
    return plan.arms[name], int(seed)


def step_launcher(env=None) -> list[str]:
    """srun's words when this process is a SLURM batch script's (an array element): the run
    then trains as a job step, which gets the job's tasks and GPUs and its warning signal
    (sent to steps, not to the batch script). Elsewhere, nothing: the run starts directly."""
    from powergrad.system.distributed import in_slurm_step

    env = os.environ if env is None else env
    return list(SRUN) if "SLURM_JOB_ID" in env and not in_slurm_step(env) else []


def lock_holder(arm: Arm, seed: int, runs_root: Path) -> dict | None:
    """Who holds the run's run.lock now (a run training it, on any host), or None; by the
    lock's own rule of staleness (powergrad/training/rundir.py)."""
    from powergrad.training.rundir import RunLock

    lock = RunLock(run_dir(runs_root, arm, seed),
                   run_recipe(arm, seed, runs_root).log.lock_stale_after)
    holder = lock._read()[1]
    return holder if holder is not None and not lock._is_stale(holder) else None


def sbatch_options(text: str | None) -> list[str]:
    """--sbatch's options as sbatch's words; sbatch itself judges them when it submits."""
    try:
        options = shlex.split(text or "")
    except ValueError as err:
        raise StudyError("--sbatch", "", f"{text!r}: {err}") from None
    if any(re.match(r"(--array\b|-a)", option) for option in options):
        raise StudyError("--sbatch", "", "--array is the study's own (one element per run); "
                         "limit the elements running at once with --array-limit N")
    return options


def array_script(study: list[str], runs: list[str], options: list[str], limit: int | None,
                 folder: Path, name: str) -> str:
    """The job array's script: `study` is the element's command up to --only."""
    span = f"0-{len(runs) - 1}" + (f"%{limit}" if limit else "")
    lines = [
        "#!/bin/bash",
        f"# Written by `powergrad study --slurm`: {len(runs)} run(s), one per element. Element K",
        "# trains runs[K] (ARM:SEED) with `powergrad study ... --only ARM:SEED`: one step,",
        f"# `{shlex.join(SRUN)} powergrad train RECIPE train.seed=SEED ...`, then the run's",
        "# record. USR1 (the time limit's warning, or scancel --signal=USR1) makes the run save",
        "# and exit 75, and the last line requeues the element to resume. `sbatch` this file",
        "# again to resubmit (recorded runs are skipped), or `powergrad study PLAN --slurm` to",
        "# submit only what is left.",
        f"#SBATCH --job-name={name} --array={span}",
        f"#SBATCH {WARNING} --requeue --open-mode=append "
        + shlex.quote(f"--output={folder}/%A_%a.out"),
        "#SBATCH " + shlex.quote(f"--chdir={Path.cwd()}"),
    ]
    if options:
        lines.append(f"#SBATCH {shlex.join(options)}")
    lines += [f"runs=({' '.join(shlex.quote(run) for run in runs)})",
              f'{shlex.join(study)} --only "${{runs[$SLURM_ARRAY_TASK_ID]}}" \\',
              f"    {REQUEUE_LINE}", ""]
    return "\n".join(lines)


def manifest(script: Path) -> list[str]:
    """The ARM:SEED of each element of an array script ([] when it is not one of ours)."""
    try:
        text = script.read_text()
    except OSError:
        return []
    found = re.search(r"^runs=\((.*)\)$", text, re.MULTILINE)
    return shlex.split(found[1]) if found else []


def _command(words: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(words[0]) is None:
        raise StudyError(words[0], "", f"not found; {INSTALL}")
    return subprocess.run(words, capture_output=True, text=True, timeout=120)


def submit(script: Path) -> str:
    """sbatch the script; its job id, or StudyError with sbatch's own words on one line."""
    done = _command(["sbatch", "--parsable", str(script)])
    if done.returncode != 0:
        words = [line.strip() for line in (done.stderr + done.stdout).splitlines()
                 if line.strip() and not line.startswith("Try ")]
        raise StudyError("--sbatch", "", f"sbatch refused the array (exit {done.returncode}): "
                         + "; ".join(words))
    return done.stdout.strip().split(";")[0]


@dataclass(frozen=True)
class Element:
    job: str  # ARRAY_INDEX: the array's job id and the element's index
    state: str  # squeue's or sacct's
    detail: str = ""  # squeue's reason, or sacct's exit code


def run_key(entry: str) -> tuple[str, int] | None:
    arm, _, seed = entry.rpartition(":")
    return (arm, int(seed)) if seed.isdigit() else None


def parse_squeue(text: str, folder: Path) -> dict[tuple[str, int], Element]:
    """(arm, seed) -> its queued element, from squeue's SQUEUE_FORMAT lines: the elements of
    arrays whose script lies in `folder`."""
    folder, queued, scripts = Path(folder).resolve(), {}, {}
    for line in text.splitlines():
        parts = line.strip().split("|", 4)
        if len(parts) < 5 or not parts[1].isdigit() or Path(parts[4]).parent != folder:
            continue
        runs = scripts.setdefault(parts[4], manifest(Path(parts[4])))
        key = run_key(runs[int(parts[1])]) if int(parts[1]) < len(runs) else None
        if key:
            queued[key] = Element(f"{parts[0]}_{parts[1]}", parts[2], parts[3])
    return queued


def read_squeue(runs_root: Path) -> dict[tuple[str, int], Element]:
    """parse_squeue of this user's jobs: the study's elements waiting or running."""
    done = _command(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", SQUEUE_FORMAT])
    if done.returncode != 0:
        raise StudyError("squeue", "", f"exit {done.returncode}: "
                         + " ".join(done.stderr.split()))
    return parse_squeue(done.stdout, slurm_folder(runs_root))


def submitted(runs_root: Path) -> dict[str, Path]:
    """Array job id -> its script, from RUNS/slurm/jobs.txt."""
    jobs = slurm_folder(runs_root) / "jobs.txt"
    lines = jobs.read_text().splitlines() if jobs.is_file() else []
    return {job: slurm_folder(runs_root) / script
            for job, _, script in (line.partition(" ") for line in lines) if script}


def parse_sacct(text: str, jobs: dict[str, Path]) -> dict[tuple[str, int], Element]:
    """(arm, seed) -> its newest element in sacct's `JobID|State|ExitCode` lines."""
    newest: dict[tuple[str, int], tuple[int, Element]] = {}
    manifests = {job: manifest(script) for job, script in jobs.items()}
    for line in text.splitlines():
        found = re.match(r"(\d+)_(\d+)\|(\w+)[^|]*\|(\S*)$", line.strip())
        runs = manifests.get(found[1], []) if found else []
        if not found or int(found[2]) >= len(runs) or not run_key(runs[int(found[2])]):
            continue
        key = run_key(runs[int(found[2])])
        if key not in newest or int(found[1]) > newest[key][0]:
            newest[key] = int(found[1]), Element(f"{found[1]}_{found[2]}", found[3], found[4])
    return {key: element for key, (_, element) in newest.items()}


def read_sacct(runs_root: Path) -> dict[tuple[str, int], Element]:
    """parse_sacct of this study's arrays; {} where sacct is missing or accounting is off."""
    jobs = submitted(runs_root)
    if not jobs or shutil.which("sacct") is None:
        return {}
    done = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(jobs), "-o",
                           "JobID,State,ExitCode"], capture_output=True, text=True, timeout=120)
    return parse_sacct(done.stdout, jobs) if done.returncode == 0 else {}


def submit_study(plan: StudyPlan, claims: list[Claim], runs_root: Path, records_root: Path,
                 study: list[str], options: list[str], limit: int | None, say=print) -> int:
    """Submit every run of the claims that is not recorded, training or queued as one array
    (`study`: the element's command up to --only). 0, also when nothing is left to submit."""
    if shutil.which("sbatch") is None:
        raise StudyError("sbatch", "", f"not found; {INSTALL}")
    order = run_order(plan, claims)
    check_runs(order, runs_root, records_root)  # a changed recipe is refused before sbatch
    queued, todo = read_squeue(runs_root), []
    for arm, seed in order:
        name, element = run_name(arm, seed), queued.get((arm.name, seed))
        state = record_if_finished(arm, seed, runs_root, records_root)
        if state in ("done", "diverged"):
            say(f"{name}: recorded{' (diverged)' if state == 'diverged' else ''}, not submitted")
        elif element:
            say(f"{name}: {element.state.lower()} as job {element.job}, not submitted again")
        elif holder := lock_holder(arm, seed, runs_root):
            say(f"{name}: training (run.lock of process {holder.get('pid')} on "
                f"{holder.get('host')}), not submitted")
        else:
            todo.append(f"{arm.name}:{seed}")
    if not todo:
        say("nothing to submit")
        return 0
    folder = slurm_folder(runs_root)
    folder.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.stem[6:]) for p in folder.glob("array-*.sh")
                      if p.stem[6:].isdigit()), default=0)
    script = folder / f"array-{number}.sh"
    script.write_text(array_script(study, todo, options, limit, folder,
                                   f"study-{plan.file.stem}"))
    try:
        job = submit(script)
    except StudyError:
        script.unlink()  # nothing was submitted: no script that looks as if it had been
        raise
    with open(folder / "jobs.txt", "a") as jobs:
        jobs.write(f"{job} {script.name}\n")
    say(f"submitted job array {job}: {len(todo)} run(s) ({', '.join(todo)}); script {script}, "
        f"each element's output {folder}/{job}_K.out, each run's log {runs_root}/ARM/sSEED.log")
    return 0


def _exit_code(log: Path) -> int | None:
    try:
        return int(log.with_suffix(".exit").read_text())
    except (OSError, ValueError):
        return None


def run_line(arm: Arm, seed: int, runs_root: Path, records_root: Path, queued: dict,
             accounted: dict) -> tuple[str, str]:
    """(state, line) of one run: recorded, running, pending, failed, stopped or not
    submitted."""
    name, key = run_name(arm, seed), (arm.name, seed)
    log = Path(runs_root) / arm.name / f"s{seed}.log"
    state = run_state(arm, seed, runs_root, records_root)
    element, code = queued.get(key), _exit_code(log)
    if state in ("done", "diverged"):
        return "recorded", f"{name}: recorded" + (" (diverged)" if state == "diverged" else "")
    if element and element.state in RUNNING:
        return "running", f"{name}: running, job {element.job} (log {log})"
    if element:
        why = f" ({element.detail})" if element.detail not in ("", "None") else ""
        return "pending", f"{name}: pending, job {element.job}{why}"
    holder = lock_holder(arm, seed, runs_root)
    if holder:
        return "running", (f"{name}: running, process {holder.get('pid')} on "
                           f"{holder.get('host')}, in no array of this study (log {log})")
    if code is not None and code not in (0, EXIT_PREEMPTED):
        return "failed", f"{name}: failed, exit code {code} (log {log})"
    failed = accounted.get(key)
    if failed and failed.state in FAILED:
        out = slurm_folder(runs_root) / f"{failed.job}.out"
        return "failed", (f"{name}: failed, job {failed.job} {failed.state} exit code "
                          f"{failed.detail} (log {out})")
    if state == "partial":
        return "stopped", (f"{name}: stopped with a checkpoint and not queued (log {log}); "
                           "--slurm submits it again to resume")
    return "not submitted", f"{name}: not submitted"


def slurm_status_lines(plan: StudyPlan, claims: list[Claim], runs_root: Path,
                       records_root: Path) -> list[str]:
    """A line per run (run_line) and a count by state."""
    queued, accounted = read_squeue(runs_root), read_sacct(runs_root)
    lines, states = [], []
    for arm, seed in run_order(plan, claims):
        state, line = run_line(arm, seed, runs_root, records_root, queued, accounted)
        states.append(state)
        lines.append(line)
    counts = [f"{states.count(s)} {s}" for s in STATES if s in states]
    return [*lines, f"{len(states)} runs: {', '.join(counts)}"]


def element_command(plan_arg: str, runs_root: Path, records_root: Path) -> list[str]:
    """What every element runs before its --only: this interpreter's powergrad, the plan and
    the study's folders as given (the script changes to this working directory first)."""
    return [sys.executable, "-m", "powergrad", "study", plan_arg, "--runs", str(runs_root),
            "--records", str(records_root)]
