"""`powergrad validate`: a finished run's final evaluation reproduced exactly, from its folder,
its export and a bare weights file, in one process and under torchrun."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_images import tiny_folder

from powergrad.commands.cli import main as cli_main


@pytest.fixture
def finished(finished_run):
    """A copy of the finished tiny run (tests/conftest.py): 2 epochs on 256 images, scored on
    51 test images (odd: 2 processes split it unevenly) in batches of 16; its final
    evaluation from summary.csv."""
    with open(finished_run / "summary.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    return finished_run, {"test_loss": float(row["eval_loss"]),
                          "test_top1": float(row["eval_top1"]),
                          "test_top5": float(row["eval_top5"])}


def scores(path: Path) -> dict:
    result = json.loads(path.read_text())
    return {k: result[k] for k in ("test_loss", "test_top1", "test_top5")}


def test_validate_reproduces_the_runs_final_evaluation(finished, tmp_path, capsys):
    run, final = finished
    assert cli_main(["validate", str(run), "--out", str(tmp_path / "v.json")]) == 0
    assert scores(tmp_path / "v.json") == final  # exactly: the same weights, data and code
    assert json.loads((tmp_path / "v.json").read_text())["images"] == 51
    line = capsys.readouterr().out.strip()
    assert line == (f"{run / 'last.pth'}: test top-1 {final['test_top1']:.2f} %, top-5 "
                    f"{final['test_top5']:.2f} %, loss {final['test_loss']:.4f} on "
                    "/usr/share/datasets/fashion-mnist (1 process(es))")


def test_an_export_and_a_weights_file_score_the_same_with_their_recipe(finished, tmp_path,
                                                                       capsys):
    run, final = finished
    assert cli_main(["export", str(run), "--checkpoint", "last", "--out",
                     str(tmp_path / "export")]) == 0
    weights = torch.load(run / "last.pth", weights_only=True)["model"]
    torch.save({"state_dict": weights}, tmp_path / "weights.pth")
    for source in (tmp_path / "export", tmp_path / "weights.pth"):
        assert cli_main(["validate", str(source), "--recipe", str(run / "recipe.yaml"),
                         "--out", str(tmp_path / "v.json")]) == 0
        assert scores(tmp_path / "v.json") == pytest.approx(final, rel=1e-6)
    capsys.readouterr()
    assert cli_main(["validate", str(tmp_path / "weights.pth")]) == 2
    assert "not a run folder, so name the recipe" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.cluster
def test_under_torchrun_every_image_is_counted_once(finished, tmp_path):
    run, final = finished
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "powergrad",
         "validate", str(run), "--out", str(tmp_path / "v.json")],
        env=dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo"),
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "v.json").read_text())
    assert (result["processes"], result["images"]) == (2, 51)  # each test image once
    got = scores(tmp_path / "v.json")
    assert (got["test_top1"], got["test_top5"]) == (final["test_top1"], final["test_top5"])
    # float32 logits summed in other batches (16 per process): equal to rounding
    assert got["test_loss"] == pytest.approx(final["test_loss"], rel=1e-6)


def test_a_missing_source_or_data_is_named_and_a_missing_out_folder_is_made(finished, tmp_path,
                                                                            capsys):
    """Checked before any scoring: a source or --data that does not exist says so (not 'not a
    run folder'); --out into folders that do not exist yet makes them, as log.output does."""
    run, final = finished
    assert cli_main(["validate", str(tmp_path / "no_such_run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"validate: {tmp_path / 'no_such_run'}: no such file or folder")
    assert cli_main(["validate", str(run), "--data", str(tmp_path / "no_such_data")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"validate: --data {tmp_path / 'no_such_data'}: no such file or folder")
    out = tmp_path / "not" / "yet" / "there" / "v.json"
    assert cli_main(["validate", str(run), "--out", str(out)]) == 0
    assert scores(out) == final
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert cli_main(["validate", str(run), "--out", str(blocked / "v.json")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_data_whose_classes_do_not_fit_the_model_is_one_line_naming_the_setting(
        finished, tmp_path, capsys):
    """--data checked against the model as training's preflight checks a recipe (the one
    place of that check): a 2-class folder for the run's 10-class model."""
    run, _ = finished
    folder = tiny_folder(tmp_path / "two_classes")
    assert cli_main(["validate", str(run), "--data", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.num_classes" in err and "has 2 classes; expected 2" in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.cluster
def test_powergrad_torchrun_validate_scores_each_image_once_and_checks_first(finished,
                                                                               tmp_path):
    """Under the launcher as under plain torchrun: 2 gloo workers give the one-process numbers;
    a source that does not exist is one line from the launcher, before any worker starts."""
    from helpers_net import free_port

    run, final = finished
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")

    def launch(*args):
        return subprocess.run(
            [sys.executable, "-m", "powergrad", "torchrun", "--nproc_per_node", "2",
             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "validate",
             *args], env=env, capture_output=True, text=True, timeout=240)
    done = launch(str(run), "--out", str(tmp_path / "v.json"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "v.json").read_text())
    assert (result["processes"], result["images"]) == (2, 51)
    got = scores(tmp_path / "v.json")
    assert (got["test_top1"], got["test_top5"]) == (final["test_top1"], final["test_top5"])
    assert got["test_loss"] == pytest.approx(final["test_loss"], rel=1e-6)
    missing = launch(str(tmp_path / "nothing_here"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"validate: {tmp_path / 'nothing_here'}: no such file or folder"
