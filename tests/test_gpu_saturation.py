"""tools/gpu_saturation.py: its CPU form end to end on a tiny ImageNet-style folder, and its
ratio against closed-form expectations (steps and loaders whose time is known)."""
from __future__ import annotations

import itertools
import runpy
import time
from pathlib import Path

import pytest
import torch
from helpers_images import textured_folder

REPO = Path(__file__).resolve().parents[1]
TOOL = runpy.run_path(str(REPO / "tools" / "gpu_saturation.py"))


def test_tiny_cpu_run_trains_resnet50_from_the_recipe(tmp_path, capsys):
    textured_folder(tmp_path / "images", per_class=4)
    images = tmp_path / "images"
    result = TOOL["main"]([
        str(REPO / "recipes" / "ffcv_imagenet" / "rn50_88_epochs.yaml"),
        "data.loader=torchvision", f"data.train_dir={images}", f"data.val_dir={images}",
        "data.workers=0", "data.img_size=32", "data.val_img_size=32", "data.min_res=null",
        "data.max_res=null", "data.num_classes=3", "model.num_classes=3",
        "train.global_batch=null", "train.batch_size=2", "train.eval_batch_size=2",
        "train.threads=1", "--steps", "2", "--warmup", "1", "--rounds", "1", "--device", "cpu"])
    assert result["batch"] == 2 and result["resolution"] == (32, 32)
    assert result["loader"] > 0 and result["resident"] > 0
    assert result["ratio"] == pytest.approx(result["loader"] / result["resident"])  # 1 round
    out = capsys.readouterr().out
    assert "note: train.amp_dtype float16 is for GPUs" in out  # the recipe's fp16, on a CPU
    assert "resnet50 on cpu (bfloat16 autocast, channels_last), batch 2 at 32 px" in out
    assert f"ratio {result['ratio']:.2f}" in out


class Clock:
    """A clock the fake step and loader advance by known amounts: the ratio is then exact,
    whatever else the machine is doing (no sleeps, no timing tolerance)."""

    def __init__(self):
        self.now = 0.0

    def step(self, seconds: float):
        def step(images, labels):
            self.now += seconds  # a device busy for a known time
            return images.shape[0]
        return step

    def loader(self, seconds: float):
        batch = (torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64))
        for _ in itertools.count():
            self.now += seconds  # a loader that takes a known time per batch
            yield batch


@pytest.mark.parametrize("load_s, want", [(0.0, 1.0), (0.03, 0.01 / 0.04), (0.01, 0.5)])
def test_ratio_is_step_time_over_step_plus_wait(load_s, want, monkeypatch):
    # the loader runs in the training thread here, so each step costs step + load time
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", lambda: clock.now)
    result = TOOL["feed_ratio"](clock.step(0.01), clock.loader(load_s), steps=8, warmup=1,
                                sync=TOOL["synchronizer"](torch.device("cpu")), rounds=2)
    assert result["ratio"] == pytest.approx(want, rel=1e-9)
    assert result["resident"] == pytest.approx(4 / 0.01, rel=1e-9)
    assert result["loader"] == pytest.approx(4 / (0.01 + load_s), rel=1e-9)
