"""`powergrad gpu-check` in its CPU form: every row runs the code its GPU form runs, with the
CPU as the device (the reduced sizes), and the parts only CUDA has say so in the table."""
from __future__ import annotations

import torch

from powergrad.commands import gpu_check, gpu_context


def table_rows(output: str) -> dict[str, list[str]]:
    """{check name: [path, result, numbers, seconds]} from the printed markdown table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("check", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_the_ffcv_and_dali_rows_run_their_cpu_form(tmp_path):
    """The rows that need the extras; tests/test_cluster.py runs the whole command without
    them (skipped rows) from a plain checkout, which covers every other row."""
    ctx = gpu_check.Context(torch.device("cpu"), gpu_check.REDUCED, tmp_path)
    threads = torch.get_num_threads()
    try:
        data = gpu_check.synthetic_data(ctx)
        steps = gpu_check.RecipeSteps(gpu_check.paper_recipe(ctx, []), ctx.device,
                                      ctx.amp_dtype, ctx.sync)
        rows = [gpu_check.loader_row(ctx, data, name, steps) for name in ("ffcv", "dali")]
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        assert row.status == "pass", row
        assert gpu_context.NO_CUDA in row.path and "feed ratio" in row.numbers


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
