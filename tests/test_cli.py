"""The `powergrad` command and the tools beside it: bad input stops before any work with a
clear message, options come in any order, and nothing is written where it was not asked."""
import csv
import json
import re
import runpy
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from powergrad.commands import check, cli, train
from powergrad.commands.arguments import build_parser
from powergrad.report import compare
from powergrad.training.runlog import RESULT_FIELDS


def run(*args):
    return subprocess.run([sys.executable, "-m", "powergrad", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.subprocess
def test_train_rejects_a_bad_recipe_before_training(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("train: {epochs: 1}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: good.yaml\noptim: {lrr: 0.1}\n")
    done = run("train", str(good), str(bad), f"log.output={tmp_path}/runs")
    assert done.returncode == 2
    assert f"{bad}: optim.lrr: unknown key" in done.stderr and "did you mean 'optim.lr'" in done.stderr
    assert not (tmp_path / "runs").exists()  # the good recipe did not start either


@pytest.mark.subprocess
def test_compare_on_a_folder_without_events(tmp_path):
    done = run("compare", str(tmp_path))
    assert done.returncode == 2 and "no TensorBoard event files" in done.stderr


@pytest.mark.subprocess
def test_check_passes():
    done = run("check")
    assert done.returncode == 0 and "OK" in done.stdout


# --- a CLI that forgives order and explains itself ----------------------------------------

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.kwargs.channels=[8, 8, 16, 16]", "data.train_subset=128", "data.eval_subset=64",
        "train.batch_size=32", "train.eval_batch_size=64", "train.epochs=1",
        "train.channels_last=false", "train.threads=1", "log.log_interval=100"]


def test_recipes_settings_and_options_in_any_order():
    for argv in (["train", "a.yaml", "b.yaml", "--compare", "nobn", "train.epochs=1"],
                 ["train", "--compare", "nobn", "a.yaml", "train.epochs=1", "b.yaml"],
                 ["train", "a.yaml", "train.epochs=1", "--compare=nobn", "b.yaml"]):
        args = cli.parse_args(argv)
        assert args.compare == "nobn"
        assert sorted(args.items) == ["a.yaml", "b.yaml", "train.epochs=1"]
    args = cli.parse_args(["compare", "run_a", "--out", "table", "run_b", "--target", "90"])
    assert (args.runs, args.out, args.target) == (["run_a", "run_b"], "table", 90.0)


def test_each_subcommand_runs_through_the_runner_its_parser_binds(monkeypatch):
    _, subs = build_parser(cli.RUNNERS)
    assert sorted(cli.RUNNERS) == sorted(subs)
    assert {name: p.get_default("func") for name, p in subs.items()} == cli.RUNNERS
    torchrun = cli.parse_args(["torchrun", "--nproc_per_node", "2", "train", "a.yaml"], cli.RUNNERS)
    assert torchrun.func is cli.RUNNERS["torchrun"]  # its arguments pass through unparsed
    ran = []
    monkeypatch.setitem(cli.RUNNERS, "compare", lambda args: ran.append(args.runs) or 7)
    assert cli.main(["compare", "run_a", "run_b"]) == 7 and ran == [["run_a", "run_b"]]


def test_bad_arguments_are_answered_with_what_to_do(capsys):
    recipe = str(REPO / "recipes" / "fashion_mnist" / "resnet_pgt.yaml")
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", recipe, "--epochs", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "unrecognized arguments: --epochs 3" in err and "key=value (e.g. train.epochs=1)" in err
    assert cli.main(["train", recipe, "train.epochs", "3"]) == 2
    assert "'train.epochs': not a recipe file and not a key=value setting" in capsys.readouterr().err
    assert cli.main(["train", recipe, "--compare", "x", "--fast-dev-run", "2"]) == 2
    assert "--fast-dev-run saves nothing" in capsys.readouterr().err


def test_describe_answers_a_schedule_timm_refuses_in_one_line(capsys):
    recipe = str(REPO / "recipes" / "imagenet" / "resnet18_cosine_pgt.yaml")
    assert cli.main(["describe", recipe, "sched.sched=wsd", "train.epochs=20"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sched.decay_epochs: got 30 with sched wsd" in err, err


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"powergrad {metadata.version('powergrad')}\n"


def test_every_subcommand_describes_itself_and_its_defaults():
    """From each subcommand's --help text: a description, and every option that takes a value
    (its entry shows a metavar) says its default."""
    _, subs = build_parser()
    assert set(subs) >= {"check", "train", "describe", "compare", "export", "validate"}
    for name, parser in subs.items():
        assert len(parser.description) > 40, name
        text = parser.format_help()
        options = text.split("options:", 1)[1] if "options:" in text else ""
        entries = re.split(r"\n(?=  -)", options)
        for entry in entries:
            flags = entry.strip().split("  ")[0]
            if flags.startswith("-h, --help") or not flags.startswith("-"):
                continue
            takes_value = any(part.strip().split(" ")[1:] for part in flags.split(","))
            words = " ".join(entry.split())
            assert not takes_value or "default" in words, (name, flags)
            assert len(words) > len(flags) + 10, (name, flags)  # it has a help text


@pytest.mark.parametrize("tool", ["plot_blocks.py", "write_ffcv.py"])
def test_tools_explain_themselves(tool, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [tool, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "tools" / tool), run_name="__main__")
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "usage:" in out
    description = out.split("\n\n")[1]
    assert description.rstrip().endswith((".", ":")), description  # no sentence cut in half


def test_check_fails_when_the_gradient_loses_precision(monkeypatch):
    """The self-check can fail: a PGT loss whose gradient is rounded to bf16 on the way back."""
    class RoundGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            return z.view_as(z)

        @staticmethod
        def backward(ctx, grad):
            return grad.to(torch.bfloat16).to(grad.dtype)

    real = check.PowerGradCrossEntropy
    monkeypatch.setattr(check, "PowerGradCrossEntropy",
                        lambda alpha, smoothing: lambda z, t: real(alpha, smoothing)(RoundGrad.apply(z), t))
    assert check.run_checks(verbose=False) is False


# --- nothing lands where it was not asked; compare shows what exists -----------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished run, trained through `powergrad train ... --compare /abs/path`."""
    tmp = tmp_path_factory.mktemp("cli")
    recipe = REPO / "recipes" / "fashion_mnist" / "resnet_pgt.yaml"
    code = train.main([str(recipe), *TINY, f"log.output={tmp / 'runs'}"],
                      compare_name=str(tmp / "tables" / "mine"))
    assert code == 0
    return tmp, tmp / "runs" / "resnet_pgt"


def test_compare_to_an_absolute_path_writes_exactly_there(finished_run):
    tmp, run_dir = finished_run
    assert (tmp / "tables" / "mine.md").is_file() and (tmp / "tables" / "mine.png").is_file()
    assert "--compare " + str(tmp / "tables" / "mine") in (tmp / "tables" / "mine.md").read_text()


def test_a_bare_compare_name_goes_beside_the_runs():
    assert compare.out_path_for("nobn", ["runs/fm/a", "runs/fm/b"]) == Path("runs/fm/nobn")
    assert compare.out_path_for("both", ["runs/fm/a", "runs/vit/b"]) == Path("runs/both")
    assert compare.out_path_for("results/x", ["runs/fm/a"]) == Path("results/x")
    assert compare.out_path_for("/tmp/y", ["runs/fm/a"]) == Path("/tmp/y")


def fake_run(path: Path, scalars: dict[str, list[tuple[int, float]]]) -> str:
    """A run folder with just these TensorBoard scalars (a partial or diverged run)."""
    path.mkdir(parents=True)
    writer = SummaryWriter(str(path))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    return str(path)


def test_compare_shows_partial_and_diverged_runs_in_any_order(finished_run, tmp_path, capsys):
    _, run_dir = finished_run
    runs = [str(run_dir),
            fake_run(tmp_path / "killed", {"train/loss": [(1, 2.3), (2, 2.2)]}),
            fake_run(tmp_path / "diverged", {"eval/top1": [(4, 50.0), (8, float("nan"))],
                                              "epoch/train_loss": [(4, 1.5), (8, float("nan"))],
                                              "epoch/train_top1": [(4, 40.0), (8, 10.0)]}),
            str(tmp_path / "empty")]
    (tmp_path / "empty").mkdir()
    tables = []
    for order in (runs, runs[::-1], runs[1:] + runs[:1]):
        assert compare.main(order) == 0
        lines = capsys.readouterr().out.splitlines()
        tables.append({line.split(" | ")[0]: line for line in lines[2:]})
    assert tables[0] == tables[1] == tables[2]  # the same rows, whatever the order
    rows = tables[0]
    assert rows["| killed"].startswith("| killed | n/a | n/a | n/a | n/a | n/a | n/a |")
    assert rows["| killed"].endswith("| no finished epoch |")
    assert rows["| diverged"].startswith("| diverged | nan | 50.00 | 10.00 | nan |")
    assert "diverged: non-finite epoch/train_loss at step 8" in rows["| diverged"]
    assert "no TensorBoard event files" in rows["| empty"]
    assert "nan" not in rows[f"| {run_dir.name}"] and "n/a" not in rows[f"| {run_dir.name}"]


def test_compare_reads_img_per_sec_of_runs_shorter_than_log_interval(finished_run):
    _, run_dir = finished_run
    assert "perf/img_per_sec" not in compare.read_scalars(run_dir)  # 4 steps < log_interval
    row = compare.summarize(run_dir)
    with open(run_dir / "summary.csv") as f:
        assert row["img_per_sec"] == pytest.approx(float(list(csv.DictReader(f))[0]["img_per_sec"]))


def test_compare_reads_back_every_result_final_json_records(finished_run):
    _, run_dir = finished_run
    final = json.loads((run_dir / "final.json").read_text())
    row = compare.summarize(run_dir)
    assert set(RESULT_FIELDS) <= set(final) and set(RESULT_FIELDS) <= set(row)
    for name in RESULT_FIELDS:  # TensorBoard keeps float32
        assert row[name] == pytest.approx(final[name], rel=1e-6, abs=1e-6), name


def test_plot_blocks_refuses_runs_without_block_records(finished_run, tmp_path, capsys):
    _, run_dir = finished_run
    plot_blocks = runpy.run_path(str(REPO / "tools" / "plot_blocks.py"))
    assert plot_blocks["block_report"]([str(run_dir)], str(tmp_path / "blocks"), "cmd") == 1
    assert "no per-block scalars" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_write_ffcv_makes_missing_folders_and_reads_the_fashion_mnist_root(tmp_path, capsys):
    tool = runpy.run_path(str(REPO / "tools" / "write_ffcv.py"))
    dst = tmp_path / "new" / "folder" / "fm_test.beton"
    tool["main"](["fashion_mnist", "/usr/share/datasets/fashion-mnist", str(dst), "--split", "test",
                  "--limit", "16", "--workers", "1"])
    sidecar = json.loads(Path(f"{dst}.json").read_text())
    assert dst.is_file() and sidecar["num_samples"] == 16 and sidecar["source"].endswith(":test")
    assert tool["main"](["fashion_mnist", "/usr/share/datasets/fashion-mnist/train",
                         str(tmp_path / "x.beton")]) == 2
    assert "--split train picks the split" in capsys.readouterr().err


@pytest.mark.subprocess
@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["train", "--help"],
                                  ["validate", "--help"]])
def test_version_and_help_start_without_torch(argv):
    """The quick answers import neither torch nor timm (seconds on a cold node)."""
    code = ("import sys\nfrom powergrad.commands.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint(sorted({'torch', 'timm'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# torch's log format (glog's): a level letter, the date, the time, then the message
TORCH_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.M)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.cluster
def test_powergrad_torchrun_prints_what_powergrad_train_prints_even_when_stopped(tmp_path):
    """Two gloo workers, SIGTERM to the launcher mid-epoch: torchrun's OMP_NUM_THREADS banner
    (avoided: the launcher sets the recipe's train.threads first) and its "Received 15 death
    signal" and "Sending process ... closing signal" lines (filtered: our line says it) are
    gone; the workers' lines and the launcher's one line remain."""
    import os
    import signal
    import time

    from helpers_net import free_port

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")
    job = subprocess.Popen(
        [sys.executable, "-m", "powergrad", "torchrun", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "train",
         str(REPO / "recipes/fashion_mnist/resnet_pgt.yaml"),
         "model.kwargs.channels=[8, 16, 32, 64]", "data.train_subset=1024", "data.eval_subset=100", "train.batch_size=16",
         "train.epochs=1", "train.threads=1", "log.log_interval=4", f"log.output={tmp_path}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + 240
    while "epoch 1/1 4/32" not in (lines or [""])[-1]:  # training: past the set-up
        assert time.time() < deadline and job.poll() is None, "".join(lines)
        lines.append(job.stdout.readline())
    job.send_signal(signal.SIGTERM)
    out = "".join(lines) + job.communicate(timeout=300)[0]
    assert job.returncode == 75, out
    assert "powergrad torchrun: SIGTERM: forwarded to the workers, which saved; exit 75" in out
    assert not TORCH_LOG_LINE.search(out) and "OMP_NUM_THREADS" not in out, out


def test_the_workers_threads_come_from_the_recipes_or_torchruns_own_rule():
    from types import SimpleNamespace

    from powergrad.commands.launch import worker_threads

    def recipes(*threads):
        return [SimpleNamespace(train=SimpleNamespace(threads=t)) for t in threads]
    assert worker_threads(recipes(4, 4), 2, {}) == "4"  # the recipes' own value
    assert worker_threads(recipes(4, None), 2, {}) == "1"  # they differ: torchrun's 1
    assert worker_threads(recipes(None), 2, {}) == "1"
    assert worker_threads(recipes(None), 1, {}) is None  # one process: torch's default
    assert worker_threads(recipes(4), 2, {"OMP_NUM_THREADS": "3"}) is None  # the user's


def test_torchruns_own_warnings_and_failures_still_show_after_the_filter():
    """Only the lines our own line repeats are dropped: a worker that would not stop, and a
    failure torchrun restarts the workers after, stay."""
    import logging

    from powergrad.commands.launch import TORCHRUN_LOGGERS, quiet_torchrun_logs

    seen = []
    keep = logging.Handler()
    keep.emit = lambda record: seen.append(record.getMessage())
    agent, processes = (logging.getLogger(name) for name in TORCHRUN_LOGGERS)
    for logger in (agent, processes):
        logger.addHandler(keep)
    try:
        quiet_torchrun_logs(restarts=1)
        agent.warning("Received %s death signal, shutting down workers", 15)
        processes.warning("Sending process %s closing signal %s", 7, "SIGTERM")
        processes.warning("Unable to shutdown process %s via %s, forcefully exiting via %s",
                          7, "SIGTERM", "SIGKILL")
        processes.error("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", 1, 0,
                        7, "python")
        quiet_torchrun_logs(restarts=0)  # no restart: our "rank 0 exited 1" says it
        processes.error("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", 1, 0,
                        7, "python")
    finally:
        for logger in (agent, processes):
            logger.removeHandler(keep)
    assert seen == ["Unable to shutdown process 7 via SIGTERM, forcefully exiting via SIGKILL",
                    "failed (exitcode: 1) local_rank: 0 (pid: 7) of binary: python"]
