"""`powergrad export`: a run's weights leave the suite and predict exactly what the trained
model predicts, through plain timm where timm builds the network, else through load_exported."""
import json
from pathlib import Path

import pytest
import timm
import torch
from helpers_runs import FINISHED_SETTINGS
from safetensors.torch import load_file

from powergrad.commands.export import export_run, load_exported, main
from powergrad.config.loading import load_recipe
from powergrad.training import checkpoint as ckpt
from powergrad.training import engine
from powergrad.training.models import build_model

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist"


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The finished tiny run's settings with timm's own ResNet stem (so plain timm builds the
    network) and EMA weights: its own run; the suite's small stem is the finished run's."""
    out = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(RECIPES / "resnet_pgt.yaml", FINISHED_SETTINGS + [
        "model.stem=default", "train.model_ema=true", "train.model_ema_decay=0.5",
        f"log.output={out}", "log.experiment=plain"])
    return Path(engine.train(recipe)["run_dir"])


def trained_model(run_dir: Path, key: str = "model"):
    """The network as the suite trained it: its own builder and the checkpoint's weights."""
    model = build_model(load_recipe(run_dir / "recipe.yaml").model)
    model.load_state_dict(ckpt.load(run_dir / "best.pth")[key])
    return model.eval()


def batch():
    return torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_plain_timm_loads_the_export_and_predicts_identically(plain_run, tmp_path):
    done = export_run(plain_run, out=tmp_path / "plain")
    assert done["plain_timm"]
    model = timm.create_model(f"local-dir:{tmp_path / 'plain'}", pretrained=True).eval()
    assert type(model).__module__ == "timm.models.resnet"
    want = trained_model(plain_run)(batch())
    assert torch.equal(model(batch()), want)
    assert torch.equal(load_exported(tmp_path / "plain")(batch()), want)
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["architecture"] == "resnet18" and "powergrad" not in config
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert "tag" not in config["pretrained_cfg"]  # not timm's published a1_in1k weights


@torch.no_grad()
def test_ema_weights_are_the_checkpoints_ema(plain_run, tmp_path):
    export_run(plain_run, out=tmp_path / "ema", ema=True)
    payload = ckpt.load(plain_run / "best.pth")
    saved = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert saved.keys() == payload["ema"].keys()
    assert all(torch.equal(saved[k], payload["ema"][k]) for k in saved)
    assert not all(torch.equal(payload["ema"][k], payload["model"][k]) for k in saved)
    model = timm.create_model(f"local-dir:{tmp_path / 'ema'}", pretrained=True).eval()
    assert torch.equal(model(batch()), trained_model(plain_run, "ema")(batch()))


@torch.no_grad()
def test_the_suites_small_stem_loads_with_load_exported(finished_run, tmp_path, capsys):
    assert main(str(finished_run), out=str(tmp_path / "small")) == 0
    assert "load_exported" in capsys.readouterr().out
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert config["powergrad"]["model"]["stem"] == "small"
    model = load_exported(tmp_path / "small")
    assert torch.equal(model(batch()), trained_model(finished_run)(batch()))
    with pytest.raises(RuntimeError, match="size mismatch"):  # timm alone builds another stem
        timm.create_model(f"local-dir:{tmp_path / 'small'}", pretrained=True)


def test_refusals_say_what_to_do(plain_run, tmp_path, capsys):
    assert main(str(plain_run), out=str(tmp_path / "x")) == 0
    assert main(str(plain_run), out=str(tmp_path / "x")) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(str(plain_run), out=str(tmp_path / "x"), overwrite=True) == 0
    assert main(str(tmp_path), out=str(tmp_path / "y")) == 2
    assert "no recipe.yaml" in capsys.readouterr().err
    assert main(str(plain_run), checkpoint="last", ema=True, out=str(tmp_path / "z")) == 0
    assert (plain_run / "export").exists() is False  # --out was honoured every time
