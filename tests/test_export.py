"""`powergrad export`: a run's weights leave the suite and predict exactly what the trained
model predicts, through plain timm where timm builds the network, else through load_exported."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from powergrad.commands.export import export_run, load_exported, main
from powergrad.config.loading import load_recipe
from powergrad.training import checkpoint as ckpt
from powergrad.training import engine
from powergrad.training.models import build_model

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist"
TINY = ["model.kwargs.channels=[8, 8, 16, 16]", "data.train_subset=128", "data.eval_subset=64",
        "train.batch_size=32", "train.eval_batch_size=64", "train.epochs=1",
        "train.channels_last=false", "train.threads=1", "train.model_ema=true",
        "train.model_ema_decay=0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs: timm's own ResNet stem (plain timm) and the suite's small stem."""
    out = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in [("plain", ["model.stem=default"]), ("small_stem", [])]:
        recipe = load_recipe(RECIPES / "resnet_pgt.yaml",
                             TINY + extra + [f"log.output={out}", f"log.experiment={name}"])
        made[name] = Path(engine.train(recipe)["run_dir"])
    return made


def trained_model(run_dir: Path, key: str = "model"):
    """The network as the suite trained it: its own builder and the checkpoint's weights."""
    model = build_model(load_recipe(run_dir / "recipe.yaml").model)
    model.load_state_dict(ckpt.load(run_dir / "best.pth")[key])
    return model.eval()


def batch():
    return torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_plain_timm_loads_the_export_and_predicts_identically(runs, tmp_path):
    done = export_run(runs["plain"], out=tmp_path / "plain")
    assert done["plain_timm"]
    model = timm.create_model(f"local-dir:{tmp_path / 'plain'}", pretrained=True).eval()
    assert type(model).__module__ == "timm.models.resnet"
    want = trained_model(runs["plain"])(batch())
    assert torch.equal(model(batch()), want)
    assert torch.equal(load_exported(tmp_path / "plain")(batch()), want)
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["architecture"] == "resnet18" and "powergrad" not in config
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert "tag" not in config["pretrained_cfg"]  # not timm's published a1_in1k weights


@torch.no_grad()
def test_ema_weights_are_the_checkpoints_ema(runs, tmp_path):
    export_run(runs["plain"], out=tmp_path / "ema", ema=True)
    payload = ckpt.load(runs["plain"] / "best.pth")
    saved = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert saved.keys() == payload["ema"].keys()
    assert all(torch.equal(saved[k], payload["ema"][k]) for k in saved)
    assert not all(torch.equal(payload["ema"][k], payload["model"][k]) for k in saved)
    model = timm.create_model(f"local-dir:{tmp_path / 'ema'}", pretrained=True).eval()
    assert torch.equal(model(batch()), trained_model(runs["plain"], "ema")(batch()))


@torch.no_grad()
def test_the_suites_small_stem_loads_with_load_exported(runs, tmp_path, capsys):
    assert main(str(runs["small_stem"]), out=str(tmp_path / "small")) == 0
    assert "load_exported" in capsys.readouterr().out
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert config["powergrad"]["model"]["stem"] == "small"
    model = load_exported(tmp_path / "small")
    assert torch.equal(model(batch()), trained_model(runs["small_stem"])(batch()))
    with pytest.raises(RuntimeError, match="size mismatch"):  # timm alone builds another stem
        timm.create_model(f"local-dir:{tmp_path / 'small'}", pretrained=True)


def test_refusals_say_what_to_do(runs, tmp_path, capsys):
    assert main(str(runs["plain"]), out=str(tmp_path / "x")) == 0
    assert main(str(runs["plain"]), out=str(tmp_path / "x")) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(str(runs["plain"]), out=str(tmp_path / "x"), overwrite=True) == 0
    assert main(str(tmp_path), out=str(tmp_path / "y")) == 2
    assert "no recipe.yaml" in capsys.readouterr().err
    assert main(str(runs["plain"]), checkpoint="last", ema=True, out=str(tmp_path / "z")) == 0
    assert (runs["plain"] / "export").exists() is False  # --out was honoured every time
