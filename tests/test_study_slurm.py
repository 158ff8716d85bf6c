"""`powergrad study PLAN --slurm` under a real single-node SLURM (tests/helpers_slurm.py): a plan
of 2 arms x 2 seeds on Fashion-MNIST subsets submitted as one job array of at most 2 elements at
once; one element preempted by `scancel --signal=USR1` while it trains, requeued by the array
script's own line and released; all four runs recorded with the numbers a local study trains;
`--slurm --status` along the way; and `--report-only`'s report the one a local study writes
from the same records. CPU only, one process per run; `make test-long` runs it (as root)."""
import json
import re
import sys
import time
from pathlib import Path

import pytest
from helpers_slurm import FINISHED, slurm  # noqa: F401  (the fixture)
from helpers_study import in_process_train, tiny_recipes

from powergrad.commands.cli import main as cli_main
from powergrad.study.plan import load_plan
from powergrad.study.runner import run_study

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.subprocess]

STEPS = 128  # per epoch: 2048 images in batches of 16, a few seconds in which to signal
RUNS = [("base", 0), ("pgt", 0), ("base", 1), ("pgt", 1)]  # the array's order, seed by seed
# what a run's final.json says about its training, not about the machine's speed
LEARNED = ("final_test_top1", "best_test_top1", "final_train_top1", "final_train_loss",
           "updates", "best_epoch", "epochs")


def write_plan(folder: Path) -> Path:
    """Two tiny recipes (an 8-16 channel ResNet, 2 epochs of 2048 images) and a plan
    comparing them over seeds 0 and 1."""
    tiny_recipes(folder, "[8, 8, 16, 16]", train_subset=2048, batch_size=16, log_interval=4)
    plan = folder / "plan.yaml"
    plan.write_text("""\
arms:
  base: {recipe: base.yaml, seeds: [0, 1], cost: tiny}
  pgt: {recipe: pgt.yaml, seeds: [0, 1], cost: tiny}
claims:
  pgt_tiny:
    statement: PGT raises test top-1
    source: a test
    baseline: base
    arms: [pgt]
    expect: {final_test_top1: higher, epochs_to_baseline: lower}
""")
    return plan


def study(capsys, *argv: str) -> tuple[int, list[str], str]:
    """`powergrad study plan.yaml --runs runs --records records ARGV` in this process: its exit
    code, stdout lines and stderr."""
    capsys.readouterr()
    code = cli_main(["study", "plan.yaml", "--runs", "runs", "--records", "records", *argv])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def elements(slurm, array: str) -> dict[int, tuple[str, str]]:
    """Index -> (job id, state) of the array's queued elements (an element not started yet
    carries the array's own id)."""
    lines = slurm.run("squeue", "-h", "-r", "-j", array, "-o", "%K %A %T").split()
    return {int(k): (job, state) for k, job, state in zip(lines[::3], lines[1::3], lines[2::3])}


def wait_for(what: str, condition, seconds: float, why=lambda: ""):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} after {seconds:.0f} s\n{why()}"
        time.sleep(0.1)
    return found


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_a_plan_through_slurm_survives_a_preemption_and_reports_as_a_local_study(
        slurm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    # what sbatch hands the elements (its default --export=ALL): this cluster, one thread
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    monkeypatch.setenv("PATH", f"{sys.prefix}/bin:{slurm.env['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    write_plan(tmp_path)

    # sbatch's own refusal, one line, and nothing left that looks submitted
    code, _, err = study(capsys, "--slurm", "--sbatch", "--partition=nope")
    assert code == 2 and err.splitlines() == [
        "powergrad study: --sbatch: sbatch refused the array (exit 1): sbatch: error: invalid "
        "partition specified: nope; sbatch: error: Batch job submission failed: Invalid "
        "partition name specified"], err
    assert not list((tmp_path / "runs" / "slurm").iterdir())

    start = time.monotonic()
    code, out, err = study(capsys, "--slurm", "--array-limit", "2", "--sbatch",
                           "--cpus-per-task=1")
    assert code == 0, err
    array, script = (tmp_path / "runs" / "slurm" / "jobs.txt").read_text().split()
    assert out[0].startswith(f"submitted job array {array}: 4 run(s) (base:0, pgt:0, base:1, "
                             f"pgt:1); script runs/slurm/{script}")
    log = tmp_path / "runs" / "base" / "s0.log"
    out0 = tmp_path / "runs" / "slurm" / f"{array}_0.out"

    def why() -> str:
        return f"{elements(slurm, array)}\n{text(out0)[-2000:]}\n{text(log)[-2000:]}"

    # element 0 (base/s0) trains: preempt it as --signal=USR1@120 would near its time limit
    job = wait_for("element 0 running", lambda: elements(slurm, array).get(0, ("", ""))[1]
                   == "RUNNING" and elements(slurm, array)[0][0], 120, why)
    wait_for("training", lambda: f"epoch 1/2 8/{STEPS} " in text(log), 120, why)
    # The signal to the element's step: to the job, SLURM 22.05 delivers it but answers "Job
    # can not be altered now" while the array has elements waiting, and scancel retries for
    # about 95 s (seen here; plain jobs and arrays with no element waiting answer at once).
    slurm.run("scancel", "--signal=USR1", f"{job}.0")
    fields = slurm.wait_for_job(job, lambda f: f["JobState"] in FINISHED or (
        f["JobState"] == "PENDING" and int(f["Restarts"]) >= 1), 120, "requeue")
    assert fields["JobState"] == "PENDING", f"not requeued: {fields}\n{why()}"
    assert fields["ArrayTaskThrottle"] == "2", fields  # --array=0-3%2
    assert "preempted: saved" in text(log), why()

    # while it waits: the status says so, and a second --slurm submits nothing
    code, out, _ = study(capsys, "--slurm", "--status")
    assert code == 0 and out[0].startswith(f"base/s0: pending, job {array}_0"), out
    code, out, _ = study(capsys, "--slurm")
    assert code == 0 and "nothing to submit" in out, out
    assert f"base/s0: pending as job {array}_0, not submitted again" in out, out
    assert len((tmp_path / "runs" / "slurm" / "jobs.txt").read_text().splitlines()) == 1

    assert slurm.release(job) > 60  # SLURM's own hold on a requeued job, lifted by the test
    wait_for("the array's end", lambda: not elements(slurm, array), 400, why)
    slurm_seconds = time.monotonic() - start
    for index, (arm, seed) in enumerate(RUNS):
        fields = slurm.job(f"{array}_{index}")
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), (fields, why())
        assert fields["Restarts"] == ("1" if index == 0 else "0"), fields
        element = text(tmp_path / "runs" / "slurm" / f"{array}_{index}.out")
        assert "Traceback" not in element, element
        run = json.loads((tmp_path / "records" / arm / f"s{seed}" / "run.json").read_text())
        assert run["exit_code"] == 0 and run["command"] == (
            f"powergrad train {arm}.yaml train.seed={seed} log.output=runs/{arm} "
            f"log.experiment=s{seed}"), run
    assert text(out0).count("[1/1] base/s0: stopped with a checkpoint") == 1, text(out0)
    assert text(out0).count("[1/1] base/s0: resuming") == 1, text(out0)
    assert text(log).count("preempted: saved") == text(log).count("resumed from") == 1

    code, out, _ = study(capsys, "--slurm", "--status")
    assert out[:5] == [f"{arm}/s{seed}: recorded" for arm, seed in RUNS] + ["4 runs: 4 recorded"]

    # the report of --report-only, and of a local study over the same records (all recorded:
    # it trains nothing), byte for byte
    assert study(capsys, "--report-only", "--out", "out/study")[0] == 0
    report = (tmp_path / "out" / "study.md").read_bytes()
    (tmp_path / "out" / "study.md").unlink()
    code, out, _ = study(capsys, "--out", "out/study")
    assert code == 0 and [line for line in out if "skipped" in line] == [
        f"[{i}/4] {arm}/s{seed}: done, skipped" for i, (arm, seed) in enumerate(RUNS, 1)]
    assert (tmp_path / "out" / "study.md").read_bytes() == report

    # the same plan trained here, one run after another: the same numbers in every record
    # (the preempted run resumed exactly), so the same report but for the runs' wall time
    plan = load_plan("plan.yaml")
    assert run_study(plan, list(plan.claims.values()), Path("local_runs"),
                     Path("local_records"), train=in_process_train, say=lambda line: None) == 0
    for arm, seed in RUNS:
        ours, local = (json.loads((tmp_path / folder / arm / f"s{seed}" / "final.json")
                                  .read_text()) for folder in ("records", "local_records"))
        assert {k: ours[k] for k in LEARNED} == {k: local[k] for k in LEARNED}, (arm, seed)
    code, _, _ = study(capsys, "--report-only", "--records", "local_records", "--out",
                       "local_out/study")
    local = (tmp_path / "local_out" / "study.md").read_text().splitlines()
    assert len(local) == len(report.decode().splitlines())
    differ = [(a, b) for a, b in zip(report.decode().splitlines(), local) if a != b]
    assert [re.sub(r"\W.*", "", a) for a, _ in differ] == ["Command", "Plan", "Time"], differ
    print(f"the SLURM part took {slurm_seconds:.0f} s")
