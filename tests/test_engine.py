"""The engine on a small slice of real Fashion-MNIST: event files, summary, resume, compare,
and the real TensorBoard server reading the run back over HTTP."""
import csv
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers_net import free_port
from helpers_runs import FINISHED_SETTINGS
from helpers_signals import handler_before_the_run, train_as_the_command_does

from powergrad.config.loading import load_recipe
from powergrad.report.compare import markdown_table, summarize
from powergrad.report.events import read_scalars
from powergrad.system.preemption import Preempted
from powergrad.training import checkpoint as ckpt
from powergrad.training import engine, step

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist"
PLOT_BLOCKS = runpy.run_path(str(RECIPES.parents[1] / "tools" / "plot_blocks.py"))
TINY = ["model.kwargs.channels=[8, 16, 32, 64]", "data.train_subset=512",
        "data.eval_subset=300", "train.batch_size=64", "train.eval_batch_size=150",
        "train.epochs=2", "log.log_interval=2", "train.channels_last=false"]


def tiny_recipe(tmp_path, name="resnet_pgt.yaml", extra=()):
    return load_recipe(RECIPES / name, TINY + [f"log.output={tmp_path}", *extra])


def read_summary(run_dir):
    with open(run_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pgt_run(tmp_path_factory):
    """The finished tiny run's settings (tests/helpers_runs.py) on the BN-free recipe with AGC
    and PGT: its own run, since the clip/ scalars read back below need clipping on."""
    tmp = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(RECIPES / "nobn_agc_pgt.yaml", FINISHED_SETTINGS + [f"log.output={tmp}"])
    summary = engine.train(recipe)
    return Path(summary["run_dir"]), summary


def test_run_writes_event_files_that_read_back(pgt_run):
    run_dir, summary = pgt_run
    scalars = read_scalars(run_dir)
    rows = read_summary(run_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    # eval scalars in the events are the ones in summary.csv and final.json
    assert [v for _, v in scalars["eval/top1"]] == pytest.approx([float(r["eval_top1"]) for r in rows])
    assert summary["final_test_top1"] == pytest.approx(float(rows[-1]["eval_top1"]))
    assert json.loads((run_dir / "final.json").read_text())["updates"] == 16  # 2 x 256 // 32
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == list(range(2, 17, 2))  # every log_interval optimizer steps
    for tag in ("train/top1", "train/lr", "perf/img_per_sec", "perf/data_wait_frac",
                "clip/grad_norm_before", "clip/grad_norm_after", "clip/agc_clipped_frac",
                "pgt/logit_norm", "pgt/entropy_p", "pgt/entropy_p_alpha", "eval/top5"):
        assert tag in scalars, tag
    # PGT at alpha 0.25 flattens p: its entropy is larger than that of p
    assert all(a > p for (_, a), (_, p) in zip(scalars["pgt/entropy_p_alpha"], scalars["pgt/entropy_p"]))
    assert (run_dir / "recipe.yaml").exists() and (run_dir / "last.pth").exists()
    assert load_recipe(run_dir / "recipe.yaml").digest() == summary["digest"]


def test_checkpoint_loads_with_weights_only(pgt_run):
    run_dir, _ = pgt_run
    payload = torch.load(run_dir / "last.pth", weights_only=True)
    assert payload["state"]["epoch"] == 2 and payload["state"]["num_updates"] == 16
    assert "fc.weight" in payload["model"]


def test_compare_table_matches_event_files(pgt_run):
    run_dir, _ = pgt_run
    row = summarize(run_dir)
    scalars = read_scalars(run_dir)
    assert row["final_test_top1"] == scalars["eval/top1"][-1][1]
    assert row["final_train_loss"] == scalars["epoch/train_loss"][-1][1]
    table = markdown_table([row], target=0.0)
    assert f"| {run_dir.name} | {row['final_test_top1']:.2f} | " in table
    assert "| 1 (8) |" in table  # the target 0 % is reached at the first eval: epoch 1, step 8


def test_resume_continues_exactly(tmp_path, monkeypatch):
    straight = engine.train(tiny_recipe(tmp_path / "a"))
    state_a = ckpt.load(Path(straight["run_dir"]) / "last.pth")

    real_epoch = engine.train_one_epoch
    calls = []

    def killed_in_second_epoch(training, epoch, state, *args, **kwargs):
        calls.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt  # like a hard kill after the first epoch's checkpoint
        return real_epoch(training, epoch, state, *args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        engine.train(tiny_recipe(tmp_path / "b"))
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    resumed = engine.train(tiny_recipe(tmp_path / "b"))
    state_b = ckpt.load(Path(resumed["run_dir"]) / "last.pth")

    assert calls == [0, 1]
    assert state_b["state"]["num_updates"] == state_a["state"]["num_updates"] == 16
    # the schedule went on where it stopped, and training is bit-for-bit the same
    lr_a = read_scalars(straight["run_dir"])["train/lr"]
    lr_b = read_scalars(resumed["run_dir"])["train/lr"]
    assert lr_b == lr_a
    for key, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][key]), key
    rows_a, rows_b = read_summary(Path(straight["run_dir"])), read_summary(Path(resumed["run_dir"]))
    assert rows_b[-1]["eval_top1"] == rows_a[-1]["eval_top1"]


def test_finished_run_is_not_trained_again(pgt_run, capsys):
    run_dir, summary = pgt_run
    recipe = load_recipe(run_dir / "recipe.yaml")
    again = engine.train(recipe, run_dir=run_dir)
    assert again["updates"] == summary["updates"]
    assert "already trained" in capsys.readouterr().out


def get_json(url, timeout=60.0):
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.subprocess
def test_tensorboard_server_serves_the_scalars(pgt_run):
    run_dir, _ = pgt_run
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/data/plugin/scalars"
        tags = {}
        deadline = time.time() + 60
        while "eval/top1" not in tags.get(".", {}) and time.time() < deadline:
            tags = get_json(f"{base}/tags")
            time.sleep(0.5)
        points = get_json(f"{base}/scalars?run=.&tag=eval/top1")
        values = [p[2] for p in points]
        expected = [float(r["eval_top1"]) for r in read_summary(run_dir)]
        assert values == pytest.approx(expected, rel=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=20)


VIT_RECIPES = sorted(p.name for p in RECIPES.glob("vit_*.yaml"))


@pytest.mark.parametrize("name", VIT_RECIPES)
def test_vit_recipes_smoke(tmp_path, name):
    recipe = load_recipe(RECIPES / name, [
        "model.kwargs.embed_dim=32", "model.kwargs.depth=2", "model.kwargs.num_heads=2",
        "data.train_subset=256", "data.eval_subset=200", "train.batch_size=64",
        "train.eval_batch_size=100", "train.epochs=1", "log.log_interval=2",
        f"log.output={tmp_path}"])
    summary = engine.train(recipe)
    scalars = read_scalars(summary["run_dir"])
    assert summary["updates"] == 4 and math.isfinite(summary["final_train_loss"])
    assert {"gpas/var/block00", "gpas/var/block01", "gpas/grad_norm/block01"} <= set(scalars)
    assert ("gpas/gate/block01" in scalars) == recipe.model.gpas.enabled
    variance = PLOT_BLOCKS["block_profile"](scalars, "var")
    assert len(variance) == 2 and all(v > 0 and math.isfinite(v) for v in variance)


def test_a_block_profile_is_each_blocks_mean_of_its_last_five_points():
    """tools/plot_blocks.py's profile on a made-up record, against means worked out by hand:
    blocks in depth order (block02 before block10), only the asked kind, fewer points than
    five averaged over what there is."""
    series = {
        "gpas/var/block10": [(2, 100.0), (4, 300.0)],  # two points: (100 + 300) / 2 = 200
        "gpas/var/block02": [(s, float(s)) for s in range(1, 8)],  # last five 3..7: mean 5
        "gpas/grad_norm/block02": [(1, 8.0), (2, 4.0), (3, 2.0), (4, 1.0), (5, 0.5), (6, 0.5)],
        "gpas/gate/block02": [(1, -1.0)], "train/loss": [(1, 9.0)],
    }
    profile = PLOT_BLOCKS["block_profile"]
    assert profile(series, "var") == [5.0, 200.0]
    assert profile(series, "grad_norm") == [1.6]  # (4 + 2 + 1 + 0.5 + 0.5) / 5, not the 8
    assert profile(series, "scale") == []


@pytest.mark.parametrize("extra", [
    # bf16 autocast + mixup/cutmix soft targets through PGT + EMA + gradient accumulation
    ["train.amp_dtype=bfloat16", "loss.mixup=0.8", "loss.cutmix=1.0", "loss.smoothing=0.1",
     "train.model_ema=true", "train.model_ema_decay=0.9", "train.grad_accum_steps=2"],
    # an fp16 recipe (a GradScaler on a GPU), norm clipping, step schedule, test-time flip
    ["train.amp_dtype=float16", "clip.clip_mode=norm", "clip.clip_grad=1.0", "sched.sched=step",
     "sched.decay_epochs=1", "train.tta_flip=true"],
])
def test_engine_options_run_end_to_end(tmp_path, extra):
    """On a CPU both run bf16 autocast (machine_fit turns fp16 into bf16 there, and says so),
    so the GradScaler saved in last.pth is the disabled one: its state_dict is empty.
    test_fp16_steps_go_through_the_grad_scaler_saved_in_the_checkpoint runs fp16 itself."""
    recipe = tiny_recipe(tmp_path, extra=extra)
    summary = engine.train(recipe)
    run_dir = Path(summary["run_dir"])
    scalars = read_scalars(run_dir)
    assert summary["updates"] == 2 * (8 // recipe.train.grad_accum_steps)
    assert math.isfinite(summary["final_train_loss"]) and summary["final_test_top1"] > 0
    assert ("eval_ema/top1" in scalars) == recipe.train.model_ema
    if recipe.clip.clip_mode == "norm":  # clipped to max norm 1 (plus float rounding)
        assert max(v for _, v in scalars["clip/grad_norm_after"]) <= 1.0 + 1e-4
    ran_with = json.loads((run_dir / "final.json").read_text())["ran_with"]
    assert ran_with["amp_dtype"] == "bfloat16"
    assert any("float16 is for GPUs" in note for note in ran_with["notes"]) == (
        recipe.train.amp_dtype == "float16")
    assert ckpt.load(run_dir / "last.pth")["scaler"] == {}


@pytest.mark.slow
def test_fp16_steps_go_through_the_grad_scaler_saved_in_the_checkpoint(tmp_path, monkeypatch):
    """train.amp_dtype=float16 as a GPU runs it: fit_to_machine is made to keep float16 (on a
    CPU it picks bf16), so the autocast is fp16 and the GradScaler is enabled, on the CPU.
    The scaler starts at 2**22 (torch's default is 2**16), too large for this net's float16
    gradients: the first backward passes overflow, GradScaler skips those optimizer steps and
    halves its scale each time, and every step it takes adds one to its growth tracker (no
    growth before 2000 of them). The steps taken are counted by torch's optimizer-step hook,
    outside the engine, so last.pth must hold scale 2**22 / 2**skipped and a tracker equal to
    the taken steps since the last skip; at least one step is skipped (the loss really was
    scaled before the fp16 backward) and at least one taken. A run stopped after its first
    epoch and resumed ends with the same scaler state and weights: the scaler is saved and
    restored (a fresh one would skip its first steps again)."""
    import dataclasses

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from powergrad.training import setup

    real_fit = setup.fit_to_machine

    def as_on_a_gpu(recipe, device, images_per_step):
        fit = real_fit(recipe, device, images_per_step)
        return dataclasses.replace(fit, amp_dtype=recipe.train.amp_dtype,
                                   notes=[n for n in fit.notes if "float16" not in n])

    class ScalerFrom2To22(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, init_scale=2.0 ** 22, **kwargs)

    monkeypatch.setattr(setup, "fit_to_machine", as_on_a_gpu)
    monkeypatch.setattr(torch.amp, "GradScaler", ScalerFrom2To22)
    taken = []  # per optimizer step of the engine (its clipping): whether the optimizer ran
    real_clip = step.clip_gradients

    def clip(*args, **kwargs):
        taken.append(False)
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(step, "clip_gradients", clip)
    extra = ["train.amp_dtype=float16", "data.train_subset=256",  # 4 steps an epoch
             "data.eval_subset=150"]
    hook = register_optimizer_step_post_hook(lambda *args: taken.__setitem__(-1, True))
    try:
        straight = engine.train(tiny_recipe(tmp_path / "a", extra=extra))
        straight_steps = list(taken)  # (the resumed runs' steps come after)
        real_epoch = engine.train_one_epoch

        def killed_in_second_epoch(training, epoch, state, *args, **kwargs):
            if epoch == 1:
                raise KeyboardInterrupt  # a hard kill after the first epoch's checkpoint
            return real_epoch(training, epoch, state, *args, **kwargs)

        monkeypatch.setattr(engine, "train_one_epoch", killed_in_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            engine.train(tiny_recipe(tmp_path / "b", extra=extra))
        monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
        resumed = engine.train(tiny_recipe(tmp_path / "b", extra=extra))
    finally:
        hook.remove()

    state_a = ckpt.load(Path(straight["run_dir"]) / "last.pth")
    assert json.loads((Path(straight["run_dir"]) / "final.json").read_text())[
        "ran_with"]["amp_dtype"] == "float16"
    assert len(straight_steps) == state_a["state"]["num_updates"] == 8
    skipped = straight_steps.count(False)
    since_last_skip = len(straight_steps) - 1 - max(
        i for i, ran in enumerate(straight_steps) if not ran)
    assert 1 <= skipped < len(straight_steps)
    assert state_a["scaler"] == {"scale": 2.0 ** 22 / 2 ** skipped, "growth_factor": 2.0,
                                 "backoff_factor": 0.5, "growth_interval": 2000,
                                 "_growth_tracker": since_last_skip}
    state_b = ckpt.load(Path(resumed["run_dir"]) / "last.pth")
    assert state_b["scaler"] == state_a["scaler"]
    for key, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][key]), key


def test_sigterm_preempts_cleanly_and_resumes_mid_epoch_exactly(tmp_path, monkeypatch):
    """A SIGTERM at the 5th step saves there and resumes to the straight run's weights. The
    signal handlers are compared with one this test installed before the runs: a run that
    ends puts that one back; a stopped run leaves both stop signals ignored (a second signal
    must not kill it between its save and its exit); none of the signals reaches it."""
    extra = ["loss.mixup=0.5", "train.model_ema=true"]  # RNG-consuming and stateful parts too
    stop_signals = (signal.SIGTERM, signal.SIGUSR1)
    with handler_before_the_run(stop_signals) as (before, received):
        straight = train_as_the_command_does(tiny_recipe(tmp_path / "a", extra=extra))
        assert [signal.getsignal(s) for s in stop_signals] == [before, before]
        state_a = ckpt.load(Path(straight["run_dir"]) / "last.pth")

        real_clip = step.clip_gradients
        updates = []

        def terminated_at_update_5(*args, **kwargs):
            updates.append(1)
            if len(updates) == 5:  # the scheduler's SIGTERM arrives during the 5th step
                os.kill(os.getpid(), signal.SIGTERM)
            return real_clip(*args, **kwargs)

        monkeypatch.setattr(step, "clip_gradients", terminated_at_update_5)
        with pytest.raises(Preempted, match="preempted: saved .*last.pth at epoch 1, batch 5"):
            train_as_the_command_does(tiny_recipe(tmp_path / "b", extra=extra))
        monkeypatch.setattr(step, "clip_gradients", real_clip)
        saved = ckpt.load(tmp_path / "b" / "resnet_pgt" / "last.pth")["state"]
        assert saved["num_updates"] == 5
        assert (saved["epoch"], saved["batch_in_epoch"]) == (0, 5)
        assert received == []  # the run's own handler took it
        # the process is about to exit: a second signal must not kill it before then
        assert [signal.getsignal(s) for s in stop_signals] == [signal.SIG_IGN, signal.SIG_IGN]
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == []
        for signum in stop_signals:  # the next command is a new process: as it finds them
            signal.signal(signum, before)

        resumed = train_as_the_command_does(tiny_recipe(tmp_path / "b", extra=extra))
        assert [signal.getsignal(s) for s in stop_signals] == [before, before]
        assert received == []
    state_b = ckpt.load(Path(resumed["run_dir"]) / "last.pth")
    assert "preempted" not in resumed and state_b["state"]["num_updates"] == 16
    for key, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][key]), key
    for key, value in state_a["ema"].items():
        assert torch.equal(value, state_b["ema"][key]), key
    rows_a, rows_b = read_summary(Path(straight["run_dir"])), read_summary(Path(resumed["run_dir"]))
    for column in ("train_loss", "train_top1", "eval_loss", "eval_top1"):
        assert [r[column] for r in rows_b] == [r[column] for r in rows_a], column


def test_channels_last_stays_off_on_the_cpu_where_onednn_would_corrupt_the_heap():
    """A 1x1 stride-2 convolution with 4 input channels (the downsample of a 4-8 channel
    ResNet) aborts the process in oneDNN's channels-last backward on this machine's CPU: that
    model trains in the default format, said in a note and in ran_with; 8 or more channels
    keep channels_last."""
    from powergrad.training import setup

    base = "recipes/fashion_mnist/resnet_baseline.yaml"
    tiny = load_recipe(base, ["model.kwargs.layers=[1, 1, 1, 1]",
                              "model.kwargs.channels=[4, 8, 8, 8]"])
    t = setup.build_training(tiny, with_data=False, device="cpu")
    assert any("channels_last is off" in n and "layer2.0.downsample.0" in n for n in t.notes)
    assert any("channels_last is off" in n for n in t.fit.record()["notes"])
    assert not t.model.layer2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    wide = load_recipe(base, ["model.kwargs.layers=[1, 1, 1, 1]",
                              "model.kwargs.channels=[8, 16, 32, 64]"])
    t = setup.build_training(wide, with_data=False, device="cpu")
    assert not any("channels_last" in n for n in t.notes)
    assert t.model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
