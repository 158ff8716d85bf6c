"""`powergrad gpu-check` in its CPU form: every row runs the code its GPU form runs, with the
CPU as the device (the reduced sizes), and the parts only CUDA has say so in the table."""
from __future__ import annotations

import torch

from powergrad import gpu_check
from powergrad.cli import main as cli_main

ROWS = ["pgt fp16 + GradScaler", "pgt bf16", "engine resnet50", "loader ffcv", "loader dali",
        "loader torchvision", "ddp", "gpu-hours"]


def table_rows(output: str) -> dict[str, list[str]]:
    """{check name: [path, result, numbers, seconds]} from the printed markdown table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("check", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_cpu_form_runs_every_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU form anywhere
    threads = torch.get_num_threads()
    try:
        code = cli_main(["gpu-check", "--workdir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert list(rows) == ROWS, out
    for name in ROWS[:-1]:
        assert rows[name][1] == "pass", f"{name}: {rows[name]}"
    assert "worst relative error" in rows["pgt fp16 + GradScaler"][2]
    assert "2 steps, train loss" in rows["engine resnet50"][2]
    for name in ("ffcv", "dali", "torchvision"):
        path, _, numbers, _ = rows[f"loader {name}"]
        assert gpu_check.NO_CUDA in path and "feed ratio" in numbers
    assert "gloo, 1 process" in rows["ddp"][0] and "relative error 0.0e+00" in rows["ddp"][2]
    # the step code of the GPU-hours row ran; only its extrapolation needs a GPU
    assert rows["gpu-hours"][1] == gpu_check.NO_CUDA and "s per step" in rows["gpu-hours"][2]
    assert "all checks passed" in out and code == 0


def test_a_failing_row_fails_the_command_and_the_others_still_run(tmp_path, monkeypatch,
                                                                   capsys):
    def passing(name):
        return lambda *args, **kwargs: gpu_check.Row(name, "cpu", "pass", "fine")

    def broken(ctx):
        raise RuntimeError("NCCL error: unhandled system error\nsecond line")

    monkeypatch.setattr(gpu_check, "pgt_row", lambda ctx, dtype: passing(str(dtype))())
    monkeypatch.setattr(gpu_check, "synthetic_data", lambda ctx: tmp_path)
    monkeypatch.setattr(gpu_check, "engine_row", passing("engine resnet50"))
    monkeypatch.setattr(gpu_check, "RecipeSteps", lambda *args, **kwargs: None)
    monkeypatch.setattr(gpu_check, "loader_row", lambda ctx, root, name, steps:
                        gpu_check.Row(f"loader {name}", "cpu", "pass", "fine"))
    monkeypatch.setattr(gpu_check, "ddp_row", broken)
    monkeypatch.setattr(gpu_check, "gpu_hours_row", passing("gpu-hours"))
    assert gpu_check.main(str(tmp_path)) == 1
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["ddp"][1:3] == ["FAIL", "RuntimeError: NCCL error: unhandled system error"]
    assert rows["gpu-hours"][1] == "pass"  # a later row still ran
    assert out.rstrip().endswith("FAILED: ddp")
