"""The PGT paper's runs as recipes: every row of Tables 1-3 exists with the paper's numbers and
settings (transcribed here from the paper, not read from the recipes), each schedule gives the
closed-form learning rate at every step, and the total batch is the paper's on any launch."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from powergrad.config.batching import BatchPlanError, plan_batch
from powergrad.config.loading import load_recipe
from powergrad.training.builders import build_scheduler

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
IMAGENET = RECIPES / "imagenet"

# (recipe, model, BN, schedule, alpha or None, label smoothing, clip mode, total batch,
#  paper train top-1, paper test top-1): Tables 1, 2 and 3 of arXiv 2111.12495 (v3).
PAPER_ROWS = [
    ("seresnet50_cosine_baseline", "seresnet50", True, "cosine", None, 0, "none", 1024, 81.5, 77.218),
    ("seresnet50_cosine_pgt", "seresnet50", True, "cosine", 0.3, 0, "none", 1024, 82.47, 77.952),
    ("resnet50_cosine_baseline", "resnet50", True, "cosine", None, 0, "none", 1024, 79.18, 76.56),
    ("resnet50_cosine_pgt", "resnet50", True, "cosine", 0.05, 0, "none", 1024, 79.68, 77.216),
    ("resnet50_step_baseline", "resnet50", True, "step", None, 0, "none", 1024, 78.99, 75.97),
    ("resnet50_step_pgt", "resnet50", True, "step", 0.05, 0, "none", 1024, 79.56, 76.494),
    ("resnet50_step_pgt_a03", "resnet50", True, "step", 0.3, 0, "none", 1024, 79.56, 76.494),
    ("resnet101_cosine_baseline", "resnet101", True, "cosine", None, 0, "none", 1024, 82.29, 77.896),
    ("resnet101_cosine_pgt", "resnet101", True, "cosine", 0.3, 0, "none", 1024, 83.1, 78.258),
    ("seresnet18_cosine_baseline", "seresnet18", True, "cosine", None, 0, "none", 1024, 71.42, 71.09),
    ("seresnet18_cosine_pgt", "seresnet18", True, "cosine", 0.25, 0, "none", 1024, 71.6, 71.436),
    ("resnet18_step_baseline", "resnet18", True, "step", None, 0, "none", 1024, 69.95, 69.704),
    ("resnet18_step_pgt", "resnet18", True, "step", 0.25, 0, "none", 1024, 70.3, 69.844),
    ("resnet18_cosine_baseline", "resnet18", True, "cosine", None, 0, "none", 1024, 70.38, 70.208),
    ("resnet18_cosine_pgt", "resnet18", True, "cosine", 0.25, 0, "none", 1024, 70.53, 70.298),
    ("resnet18_nobn_b1024_baseline", "resnet18", False, "cosine", None, 0, "none", 1024, 66.27, 64.816),
    ("resnet18_nobn_b1024_pgt", "resnet18", False, "cosine", 0.92, 0, "none", 1024, 66.62, 65.498),
    ("resnet18_nobn_b512_baseline", "resnet18", False, "cosine", None, 0, "none", 512, 68.02, 66.552),
    ("resnet18_nobn_b512_pgt", "resnet18", False, "cosine", 0.25, 0, "none", 512, 69.5, 67.236),
    ("resnet18_nobn_b256_baseline", "resnet18", False, "cosine", None, 0, "none", 256, 68.86, 66.796),
    ("resnet18_nobn_b256_gc", "resnet18", False, "cosine", None, 0, "norm", 256, 69.04, 67.064),
    ("resnet18_nobn_b256_agc", "resnet18", False, "cosine", None, 0, "agc", 256, 69.06, 67.298),
    ("resnet18_nobn_b256_pgt", "resnet18", False, "cosine", 0.25, 0, "none", 256, 69.97, 67.814),
    ("resnet18_nobn_b256_gc_pgt", "resnet18", False, "cosine", 0.25, 0, "norm", 256, 68.67, 67.088),
    ("resnet18_nobn_b256_agc_pgt", "resnet18", False, "cosine", 0.25, 0, "agc", 256, 70.92, 68.856),
    ("resnet50_cosine_ls_baseline", "resnet50", True, "cosine", None, 0.1, "none", 1024, 78.81, 76.698),
    ("resnet50_cosine_pgt_a03", "resnet50", True, "cosine", 0.3, 0, "none", 1024, 79.43, 76.886),
    ("resnet50_cosine_ls_pgt_a03", "resnet50", True, "cosine", 0.3, 0.1, "none", 1024, 78.47, 76.968),
    ("resnet50_cosine_ls_pgt", "resnet50", True, "cosine", 0.05, 0.1, "none", 1024, 77.69, 76.39),
]
PAPER_LR_PER_1024 = 0.4


def paper_recipes() -> list[Path]:
    """Every recipe that carries a paper's (or ffcv-imagenet's) numbers."""
    return sorted(p for folder in ("imagenet", "ffcv_imagenet") for p in (RECIPES / folder).glob("*.yaml")
                  if load_recipe(p).paper)


@pytest.mark.parametrize("row", PAPER_ROWS, ids=lambda r: r[0])
def test_every_paper_row_has_a_recipe_with_its_settings_and_numbers(row):
    name, model, bn, schedule, alpha, smoothing, clip, batch, train_top1, test_top1 = row
    recipe = load_recipe(IMAGENET / f"{name}.yaml")
    assert recipe.model.model == model
    assert recipe.model.norm == ("batch" if bn else "none")
    assert recipe.sched.sched == {"cosine": "cosine", "step": "multistep"}[schedule]
    assert recipe.pgt.enabled == (alpha is not None)
    if alpha is not None:
        assert recipe.pgt.alpha == alpha
    assert recipe.loss.smoothing == smoothing and recipe.loss.mixup == 0
    assert recipe.clip.clip_mode == clip
    if clip == "agc":
        assert recipe.clip.exclude_head
    assert recipe.train.global_batch == batch
    assert recipe.optim.lr == pytest.approx(PAPER_LR_PER_1024 * batch / 1024)
    assert (recipe.optim.opt, recipe.optim.momentum, recipe.optim.weight_decay) == ("sgd", 0.9, 5e-4)
    assert recipe.optim.filter_bias_and_bn
    assert recipe.model.kwargs.get("zero_init_last") is False
    assert (recipe.data.scale, recipe.data.crop_pct, recipe.data.img_size) == ((0.08, 1.0), 0.875, 224)
    assert (recipe.paper["train_top1"], recipe.paper["test_top1"]) == (train_top1, test_top1)


def test_the_sixty_epoch_claim_has_a_recipe():
    recipe = load_recipe(IMAGENET / "resnet50_cosine_pgt_60ep.yaml")
    assert recipe.pgt.enabled and recipe.model.model == "resnet50"
    assert recipe.train.epochs + recipe.sched.cooldown_epochs == 60
    assert recipe.paper["test_top1"] == 76.5


def closed_form_lr(recipe, epoch: float) -> float:
    """The lr at a position in training (epochs, fractional), written from the papers'
    descriptions: linear warm-up from warmup_lr to the peak, then cosine over train.epochs to
    min_lr and min_lr through the cool-down, or /10 at each milestone; ffcv-imagenet's
    triangle is np.interp over (0, 1e-4 lr), (2, lr), (epochs, 0)."""
    sched, peak, epochs = recipe.sched, recipe.optim.lr, recipe.train.epochs
    if sched.sched == "wsd":
        return float(np.interp(epoch, [0, sched.warmup_epochs, epochs], [1e-4 * peak, peak, 0]))
    if epoch < sched.warmup_epochs:
        return sched.warmup_lr + (peak - sched.warmup_lr) * epoch / sched.warmup_epochs
    if sched.sched == "cosine":
        if epoch >= epochs:
            return sched.min_lr
        return sched.min_lr + 0.5 * (peak - sched.min_lr) * (1 + math.cos(math.pi * epoch / epochs))
    assert sched.sched == "multistep"
    return peak * sched.decay_rate ** sum(epoch >= m for m in sched.decay_milestones)


def expected_epochs(recipe) -> int:
    """Cosine and the triangle: epochs + cool-down. Step: the paper's 100 are train.epochs."""
    return recipe.train.epochs + (recipe.sched.cooldown_epochs if recipe.sched.sched == "cosine" else 0)


@pytest.mark.parametrize("path", paper_recipes(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_schedule_matches_the_closed_form_at_every_step(path):
    recipe = load_recipe(path)
    steps_per_epoch = 8  # the lr is updated every step; 8 points per epoch, 4 inside warm-up
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.optim.lr)
    scheduler, total_epochs = build_scheduler(recipe, optimizer, steps_per_epoch)
    assert total_epochs == expected_epochs(recipe)
    if "imagenet" == path.parent.name and "60ep" not in path.name:
        assert total_epochs == 100  # the paper's budget, for every schedule
    early = {m * steps_per_epoch - 1 for m in recipe.sched.decay_milestones} \
        if recipe.sched.sched == "multistep" else set()
    for step in range(total_epochs * steps_per_epoch):
        scheduler.step_update(num_updates=step)
        got = optimizer.param_groups[0]["lr"]
        position = step / steps_per_epoch
        if step in early:
            # timm's multistep applies a milestone one update early (it compares against
            # t + 1): the last step before epoch 30 already runs at the decayed lr.
            position = (step + 1) / steps_per_epoch
        assert got == pytest.approx(closed_form_lr(recipe, position), rel=1e-9, abs=1e-12), \
            f"{path.name}: step {step} (epoch {step / steps_per_epoch})"


def test_engine_runs_the_cool_down_epochs(tmp_path):
    from powergrad.training import engine

    recipe = load_recipe(RECIPES / "fashion_mnist" / "resnet_baseline.yaml", [
        "train.epochs=1", "sched.cooldown_epochs=1", "sched.warmup_epochs=0",
        "sched.min_lr=0.001", "data.train_subset=256", "data.eval_subset=100",
        "train.batch_size=64", "train.eval_batch_size=100", "model.kwargs.channels=[8, 8, 8, 8]",
        f"log.output={tmp_path}"])
    summary = engine.train(recipe)
    assert summary["epochs"] == 2 and summary["updates"] == 2 * (256 // 64)
    import csv
    with open(Path(summary["run_dir"]) / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[1]["lr"]) == pytest.approx(0.001)  # the cool-down runs at min_lr


@pytest.mark.parametrize("world_size, micro, accum", [(1, 256, 4), (2, 256, 2), (4, 256, 1),
                                                      (8, 128, 1), (16, 64, 1)])
def test_the_paper_total_batch_on_any_launch(world_size, micro, accum):
    recipe = load_recipe(IMAGENET / "resnet50_cosine_pgt.yaml")
    plan = plan_batch(recipe.train.global_batch, recipe.train.batch_size,
                      recipe.train.grad_accum_steps, world_size)
    assert (plan.micro_batch, plan.accum_steps) == (micro, accum)
    assert plan.global_batch == 1024 == world_size * micro * accum


def test_batch_plans_that_cannot_meet_the_total_are_refused():
    with pytest.raises(BatchPlanError, match="cannot be split evenly over 3 processes"):
        plan_batch(1024, 256, 1, 3)
    with pytest.raises(BatchPlanError, match="leave grad_accum_steps at 1"):
        plan_batch(1024, 256, 2, 4)
    assert plan_batch(None, 64, 3, 2).global_batch == 384  # timm's per-process meaning
    assert plan_batch(96, 40, 1, 1) == plan_batch(96, 32, 1, 1)  # 3 x 32: the fewest steps that fit


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "powergrad", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.subprocess
def test_a_launch_at_the_wrong_total_batch_is_refused_before_any_work(tmp_path):
    done = run_cli("train", str(IMAGENET / "resnet50_cosine_pgt.yaml"), f"log.output={tmp_path}",
                   env={"WORLD_SIZE": "3"})
    assert done.returncode == 2
    assert "train.global_batch: train.global_batch 1024 cannot be split evenly over 3" in done.stderr
    assert "base.yaml" in done.stderr and not any(tmp_path.iterdir())


@pytest.mark.subprocess
def test_describe_prints_the_plan_and_writes_the_schedule_plot(tmp_path):
    png = tmp_path / "lr.png"
    done = run_cli("describe", str(IMAGENET / "seresnet50_cosine_pgt.yaml"), "--png", str(png))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    with torch.device("meta"):
        reference = timm.create_model("seresnet50", num_classes=1000)
    total = sum(p.numel() for p in reference.parameters())
    one_d = sum(p.numel() for p in reference.parameters() if p.ndim <= 1)
    assert f"model seresnet50: {total:,} parameters" in out
    assert f"weight_decay 0: " in out and f"{one_d:,} values" in out
    assert "pgt.alpha = 0.3  <- " in out and "seresnet50_cosine_pgt.yaml" in out
    assert "optim.lr = 0.4  <- " in out and "base.yaml" in out
    for line in ("1 process(es) x 256 images x 4 accumulation step(s) = 1024 per step",
                 "8 process(es) x 128 images x 1 accumulation step(s) = 1024 per step",
                 "100 epochs to train (train.epochs 90 + cool-down 10)",
                 "lr at epoch 0: 0.0004", "lr at epoch 99: 0.0004",
                 "test_top1 77.952"):
        assert line in out, line
    lr45 = 4e-4 + 0.5 * (0.4 - 4e-4) * (1 + math.cos(math.pi * 45 / 90))
    assert f"lr at epoch 45: {lr45:.6g}" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.subprocess
def test_recipes_readme_is_generated_from_the_current_recipes():
    tool = Path(__file__).resolve().parent.parent / "tools" / "recipes_table.py"
    done = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
