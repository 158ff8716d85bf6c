"""A checkpoint resumes on another machine: fewer visible GPUs (each process saves and restores
its own device's CUDA random state) and a GradScaler on one side only (a float16 run started
on a CPU trains in bfloat16 without one)."""
import dataclasses
from pathlib import Path

import pytest
import torch

from powergrad.config.loading import load_recipe
from powergrad.training import checkpoint as ckpt
from powergrad.training import engine, setup

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist"
# 4 optimizer steps an epoch, 2 epochs, float16 asked for (as the ImageNet recipes do)
TINY_FP16 = ["model.kwargs.channels=[8, 16, 32, 64]", "data.train_subset=256",
             "data.eval_subset=150", "train.batch_size=64", "train.eval_batch_size=150",
             "train.epochs=2", "log.log_interval=2", "train.channels_last=false",
             "train.amp_dtype=float16"]


def states(count: int) -> list[torch.Tensor]:
    return [torch.full((16,), i, dtype=torch.uint8) for i in range(count)]


def test_each_device_gets_its_own_saved_cuda_state_or_none_with_a_note():
    own, note = ckpt.own_cuda_state(states(4)[2], 0)  # today's format: the saver's own device
    assert torch.equal(own, states(4)[2]) and note is None
    # the older format, saved by a process that saw 4 GPUs, resumed where one is visible
    own, note = ckpt.own_cuda_state(states(4), 0)
    assert torch.equal(own, states(4)[0]) and note is None
    own, note = ckpt.own_cuda_state(states(1), 3)  # one saved, this process drives cuda:3
    assert own is None and "none for cuda:3" in note
    own, note = ckpt.own_cuda_state(None, 0)
    assert own is None and "saved on the CPU" in note


def test_an_old_four_gpu_checkpoint_restores_on_a_one_gpu_machine(monkeypatch):
    """torch.cuda's setter is replaced by one that refuses device indices a one-GPU machine
    does not have, as the driver does; the old restore set all four."""
    restored = []

    def set_rng_state(state, device="cuda"):
        index = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if (index.index or 0) >= 1:
            raise RuntimeError("CUDA error: invalid device ordinal")
        restored.append(state)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    saved = ckpt.rng_state()
    saved["cuda"] = states(4)
    assert ckpt.restore_rng_state(saved, torch.device("cuda", 0)) == []
    assert len(restored) == 1 and torch.equal(restored[0], states(4)[0])


def test_a_cpu_process_saves_no_cuda_state_and_a_gpu_process_its_own_device_only(monkeypatch):
    """On a GPU machine (faked: CUDA available and initialised) a process training on the CPU
    (train.device: cpu) stores no CUDA key; one training on cuda:2 stores cuda:2's state."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states(4))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states(4)[device])
    assert "cuda" not in ckpt.rng_state()
    assert "cuda" not in ckpt.rng_state(torch.device("cpu"))
    assert torch.equal(ckpt.rng_state(torch.device("cuda", 2))["cuda"], states(4)[2])


def keep_float16(monkeypatch):
    """fit_to_machine keeps float16 as on a GPU: the autocast is fp16 and the GradScaler on,
    on the CPU (as tests/test_engine.py's fp16 test does)."""
    real_fit = setup.fit_to_machine

    def as_on_a_gpu(recipe, device, images_per_step):
        fit = real_fit(recipe, device, images_per_step)
        return dataclasses.replace(fit, amp_dtype=recipe.train.amp_dtype,
                                   notes=[n for n in fit.notes if "float16" not in n])

    monkeypatch.setattr(setup, "fit_to_machine", as_on_a_gpu)


def first_epoch_only(tmp_path, monkeypatch) -> Path:
    """Train the first epoch (its last.pth written), then die as a hard kill would."""
    real_epoch = engine.train_one_epoch

    def killed_in_second_epoch(training, epoch, state, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(training, epoch, state, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_one_epoch", killed_in_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            engine.train(load_recipe(RECIPES / "resnet_pgt.yaml",
                                     TINY_FP16 + [f"log.output={tmp_path}"]))
    return tmp_path / "resnet_pgt"


@pytest.mark.slow
@pytest.mark.parametrize("started_with_scaler", [False, True])
def test_a_float16_run_resumes_across_a_scaler_change_with_a_note(
        tmp_path, monkeypatch, capsys, started_with_scaler):
    """Started on a CPU (bfloat16, no scaler) and resumed on a GPU (float16, a scaler: torch's
    CPU GradScaler in real fp16 here), and the reverse: the run trains its second epoch with
    the scaler the resuming machine uses, and says what it could not take over."""
    with monkeypatch.context() as patch:
        if started_with_scaler:
            keep_float16(patch)
        run_dir = first_epoch_only(tmp_path, monkeypatch)
    saved = ckpt.load(run_dir / "last.pth")
    assert bool(saved["scaler"]) == started_with_scaler and saved["state"]["epoch"] == 1
    capsys.readouterr()
    if not started_with_scaler:
        keep_float16(monkeypatch)
    summary = engine.train(load_recipe(RECIPES / "resnet_pgt.yaml",
                                       TINY_FP16 + [f"log.output={tmp_path}"]))
    out = capsys.readouterr().out
    assert "resumed from" in out and summary["epochs"] == 2 and summary["updates"] == 8
    assert summary["ran_with"]["amp_dtype"] == ("bfloat16" if started_with_scaler
                                                else "float16")
    scaler = ckpt.load(run_dir / "last.pth")["scaler"]
    if started_with_scaler:
        assert "note: the checkpoint's GradScaler (scale " in out and scaler == {}
        assert "is not used: this run trains without one" in out
    else:
        assert "note: the checkpoint was saved without a GradScaler" in out
        assert "starts a fresh one at scale 65536" in out and scaler["scale"] > 0
