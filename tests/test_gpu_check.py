"""`powergrad gpu-check` in its CPU form: every row runs the code its GPU form runs, with the
CPU as the device (the reduced sizes), and the parts only CUDA has say so in the table."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from powergrad.commands import gpu_check, gpu_context, gpu_engine


def table_rows(output: str) -> dict[str, list[str]]:
    """{check name: [path, result, numbers, seconds]} from the printed markdown table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("check", "---"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow  # about 45 s: ResNet-50 steps fed by each loader
def test_the_ffcv_and_dali_rows_run_their_cpu_form(tmp_path):
    """The rows that need the extras; tests/test_cluster.py runs the whole command without
    them (skipped rows) from a plain checkout, which covers every other row."""
    ctx = gpu_check.Context(torch.device("cpu"), gpu_check.REDUCED, tmp_path)
    data = gpu_check.synthetic_data(ctx)
    steps = gpu_check.RecipeSteps(gpu_check.paper_recipe(ctx, []), ctx.device, ctx.amp_dtype,
                                  ctx.sync)
    rows = [gpu_check.loader_row(ctx, data, name, steps) for name in ("ffcv", "dali")]
    for row in rows:
        assert row.status == "pass", row
        assert gpu_context.NO_CUDA in row.path and "feed ratio" in row.numbers


def test_a_failing_row_fails_the_command_and_the_others_still_run(tmp_path, monkeypatch,
                                                                   capsys):
    """The real rows on the CPU, with one fault put in: the synthetic data cannot be written.
    Each row that needs the data fails with the error's first line; the rows that do not (PGT's
    autocast checks, the GPU-hours step timing) still run after those failures and report
    their own results; the command exits 1 naming exactly the failed rows. The ddp row is the
    only other one replaced: it spawns 2 processes for 15 s (tests/test_cluster.py runs it)."""
    def disk_full(ctx):
        raise OSError("No space left on device\nsecond line")

    monkeypatch.setattr(gpu_check, "synthetic_data", disk_full)
    monkeypatch.setattr(gpu_check, "ddp_row", lambda ctx: gpu_check.Row("ddp", "cpu", "pass"))
    assert gpu_check.main(str(tmp_path)) == 1
    out = capsys.readouterr().out
    rows = table_rows(out)
    needs_data = ["engine resnet50", "loader ffcv", "loader dali", "loader torchvision",
                  "engine ddp resnet50", "engine ddp torchcompile"]
    assert list(rows) == ["pgt fp16 + GradScaler", "pgt bf16", *needs_data[:4], "ddp",
                          *needs_data[4:], "gpu-hours"]  # every row, in order
    for name in needs_data:
        assert rows[name][1:3] == ["FAIL", "OSError: No space left on device"], name
    for name in ("pgt fp16 + GradScaler", "pgt bf16"):  # the real checks, on the CPU
        assert rows[name][1] == "pass" and "vs float64 closed form" in rows[name][2], name
    # after six failures the last row still ran its step code on the CPU
    _, result, numbers, _ = rows["gpu-hours"]
    assert result == "skipped: no CUDA device" and "s per step" in numbers
    assert out.rstrip().endswith("FAILED: " + ", ".join(needs_data))


def test_a_run_that_trains_and_then_hangs_fails_and_leaves_no_process(tmp_path):
    """The engine rows' launches: a process that printed its last line but does not exit is
    killed with everything under it (torchrun's workers sit in sessions of their own), and
    the row's error names the hang and that last line."""
    child = tmp_path / "child.pid"
    script = (f"import os, subprocess, sys, time\n"
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
              f" start_new_session=True)\n"
              f"open({str(child)!r}, 'w').write(str(p.pid))\n"
              f"print('fast dev run OK: 2 step(s), train loss 2.3,', flush=True)\n"
              f"time.sleep(60)\n")
    launch = gpu_engine.Launch([sys.executable, "-c", script], dict(os.environ))
    found = launch.wait_for(r"train loss (\S+),", timeout=30)
    assert found is not None and found.group(1) == "2.3"
    while not child.exists():
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match=r"had not exited 1 s later \(killed\); last line: "
                                           r"fast dev run OK"):
        launch.finish("the run", timeout=1)
    assert launch.proc.poll() == -signal.SIGKILL
    assert not running(int(child.read_text()))  # in a session of its own, killed all the same


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for init to collect it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.05)
    return True



def test_a_failed_launch_names_the_workers_error_not_the_launchers_last_line(tmp_path):
    ctx = gpu_check.Context(torch.device("cpu"), gpu_check.REDUCED, tmp_path)
    script = ("print('Traceback (most recent call last):')\n"
              "print('ValueError: SyncBatchNorm layers only work with GPU modules')\n"
              "print('powergrad torchrun: rank 0 exited 1 (its message is above)')\n"
              "raise SystemExit(1)\n")
    with pytest.raises(RuntimeError, match=r"^the twin exited 1: ValueError: SyncBatchNorm "
                                           r"layers only work with GPU modules$"):
        gpu_engine._run(ctx, [sys.executable, "-c", script], "the twin")
