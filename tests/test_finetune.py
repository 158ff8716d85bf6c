"""Fine-tuning: model.initial_checkpoint (a run folder, an export, a timm state-dict file) and
model.pretrained (timm's weights from the local cache) give the run its first weights."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers_images import textured_folder
from helpers_runs import FINISHED_RECIPE

from powergrad.commands.cli import main as cli_main
from powergrad.config.loading import load_recipe
from powergrad.training import finetune
from powergrad.training.models import build_model

REPO = Path(__file__).resolve().parents[1]
FASHION = FINISHED_RECIPE  # the finished run's (tests/conftest.py), so its weights fit
SMALL = ["data.train_subset=40", "data.eval_subset=20", "train.batch_size=20", "train.epochs=1",
         "sched.cooldown_epochs=0", "sched.warmup_epochs=0"]


def parameters(path: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors of a checkpoint (BatchNorm's running statistics left out: a
    training epoch moves them whatever the lr)."""
    state = torch.load(path, weights_only=True)["model"]
    return {k: v for k, v in state.items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.parametrize("start", ["run folder", "export", "state-dict file"])
def test_a_run_starts_from_the_given_weights(start, finished_run, tmp_path, capsys):
    """With lr 0 an epoch leaves every parameter where it started: the fine-tuned run's
    parameters are then the source's, exactly."""
    if start == "export":
        source = tmp_path / "export"
        assert cli_main(["export", str(finished_run), "--out", str(source)]) == 0
    elif start == "state-dict file":  # timm's train.py layout, DDP prefixes and all
        source = tmp_path / "released.pth"
        weights = torch.load(finished_run / "best.pth", weights_only=True)["model"]
        torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, source)
    else:
        source = finished_run
    capsys.readouterr()
    assert cli_main(["train", str(FASHION), *SMALL, "optim.lr=0", "sched.sched=none",
                     f"model.initial_checkpoint={source}", f"log.output={tmp_path / 'runs'}",
                     "log.experiment=tuned"]) == 0
    assert "note: model.initial_checkpoint: started from " in capsys.readouterr().out
    tuned, original = (parameters(tmp_path / "runs/tuned/last.pth"),
                       parameters(finished_run / "best.pth"))
    assert tuned.keys() == original.keys()
    assert all(torch.equal(tuned[k], original[k]) for k in original)


def test_another_class_count_reinitialises_the_classifier_only(tmp_path, capsys):
    textured_folder(tmp_path / "three/train", per_class=4)
    textured_folder(tmp_path / "three/val", per_class=1, seed=1)
    shutil.copytree(tmp_path / "three", tmp_path / "two")
    for split in ("train", "val"):
        shutil.rmtree(tmp_path / "two" / split / "cat")
    recipe = REPO / "recipes/imagenet/resnet18_cosine_pgt.yaml"

    def run(data: str, classes: int, *extra: str) -> int:
        return cli_main(["train", str(recipe), f"data.train_dir={tmp_path / data / 'train'}",
                         f"data.val_dir={tmp_path / data / 'val'}", "data.loader=torchvision",
                         "data.workers=0", "data.img_size=32", "data.val_img_size=32",
                         f"model.num_classes={classes}", f"data.num_classes={classes}",
                         "train.global_batch=4", "train.batch_size=4", "train.epochs=1",
                         "sched.cooldown_epochs=0", "sched.warmup_epochs=0",
                         "train.amp_dtype=float32", f"log.output={tmp_path / 'runs'}", *extra])
    assert run("three", 3, "log.experiment=three") == 0
    capsys.readouterr()
    assert run("two", 2, "log.experiment=two", "optim.lr=0", "sched.sched=none",
               f"model.initial_checkpoint={tmp_path / 'runs/three'}") == 0
    out = capsys.readouterr().out
    assert "classifier fc.weight, fc.bias re-initialised (shape (3, 512) there, (2, 512) " \
           "here: another class count)" in out
    tuned = parameters(tmp_path / "runs/two/last.pth")
    original = parameters(tmp_path / "runs/three/best.pth")
    assert tuned["fc.weight"].shape == (2, 512)
    assert all(torch.equal(tuned[k], original[k]) for k in original if not k.startswith("fc."))


def test_weights_that_do_not_fit_or_are_absent_are_refused_before_work(finished_run, tmp_path,
                                                                       capsys):
    vit = REPO / "recipes/fashion_mnist/vit_pre.yaml"
    assert cli_main(["train", str(vit), f"model.initial_checkpoint={finished_run}",
                     f"log.output={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"recipe error: command line (model.initial_checkpoint={finished_run}"
                          f"): model.initial_checkpoint: got '{finished_run}': "
                          f"{finished_run / 'best.pth'}: its weights do not fit ")
    assert "\n" not in err and not (tmp_path / "runs").exists()
    assert cli_main(["train", str(FASHION), f"model.initial_checkpoint={tmp_path / 'none.pth'}",
                     f"log.output={tmp_path / 'runs'}"]) == 2
    assert f"{tmp_path / 'none.pth'}: no such file" in capsys.readouterr().err


def test_pretrained_weights_come_from_the_local_cache_only(tmp_path, monkeypatch, capsys):
    """Absent from the cache: one line saying how to fetch them. Present (a file standing in
    for the cache's): timm's own pretrained loading reads it, adapting the head."""
    monkeypatch.setattr(finetune, "cached_pretrained_file", lambda name: None)
    assert cli_main(["train", str(FASHION), "model.pretrained=true",
                     f"log.output={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained: got true, but timm's weights for resnet18 are not in the " \
           "Hugging Face cache" in err and "timm.create_model('resnet18', pretrained=True)" in err

    import timm
    from safetensors.torch import save_file
    released = timm.create_model("resnet18", num_classes=1000)
    save_file(released.state_dict(), str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(finetune, "cached_pretrained_file",
                        lambda name: str(tmp_path / "model.safetensors"))
    cfg = load_recipe(REPO / "recipes/imagenet/resnet18_cosine_pgt.yaml",
                      ["model.pretrained=true", "model.num_classes=3"]).model
    model = build_model(cfg, pretrained=True)
    assert torch.equal(model.layer1[0].conv1.weight, released.layer1[0].conv1.weight)
    assert model.fc.weight.shape == (3, 512)  # timm re-initialised the head for 3 classes
