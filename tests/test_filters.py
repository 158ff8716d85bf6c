"""Filter-collapse counts against a hand computation, and the engine logging them."""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from powergrad.config.loading import load_recipe
from powergrad.report.events import read_scalars
from powergrad.training import engine
from powergrad.training.filters import FilterCollapse
from powergrad.training.models import build_model

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist"


def test_counts_filters_below_one_percent_of_their_initial_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1, bias=False))
    start = [m.weight.detach().double().numpy().copy() for m in (model[0], model[2])]
    collapse = FilterCollapse(model)
    with torch.no_grad():
        model[0].weight[1].mul_(0.009)  # below 1 %: collapsed
        model[0].weight[4].mul_(0.011)  # just above: not
        model[2].weight[0].zero_()
        model[2].weight[3].mul_(-0.005)  # the sign does not matter, the norm does
        model[2].weight[2].mul_(50.0)
    got = collapse.counts()
    want = {}
    for name, before, conv in (("0", start[0], model[0]), ("2", start[1], model[2])):
        after = conv.weight.detach().double().numpy()
        norm = lambda w: np.sqrt((w.reshape(len(w), -1) ** 2).sum(1))  # noqa: E731
        want[name] = int((norm(after) < 0.01 * norm(before)).sum())
    assert want == {"0": 1, "2": 2}
    assert got["filters/collapsed/0"] == want["0"] and got["filters/collapsed/2"] == want["2"]
    assert got["filters/collapsed_total"] == 3
    assert math.isclose(got["filters/collapsed_share"], 3 / 10)


def test_engine_logs_the_counts_when_asked(tmp_path):
    recipe = load_recipe(RECIPES / "nobn_baseline.yaml", [
        "log.filter_collapse=true", "data.train_subset=256", "data.eval_subset=100",
        "train.batch_size=64", "train.eval_batch_size=100", "train.epochs=1",
        "log.log_interval=2", f"log.output={tmp_path}", "log.checkpoint=false"])
    summary = engine.train(recipe)
    scalars = read_scalars(summary["run_dir"])
    convs = [n for n, m in build_model(recipe.model).named_modules()
             if isinstance(m, nn.Conv2d)]
    assert {f"filters/collapsed/{n}" for n in convs} <= set(scalars)
    assert [step for step, _ in scalars["filters/collapsed_total"]] == [2, 4]
    assert all(0 <= v <= 1 for _, v in scalars["filters/collapsed_share"])
