"""A run directory never disagrees with what trained: a changed recipe, a second process, a
non-finite loss, a kill -9 or a damaged checkpoint each get a refusal or an exact recovery."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from helpers_runs import FINISHED_SETTINGS

from powergrad.config.loading import load_recipe
from powergrad.report.events import read_scalars
from powergrad.training import checkpoint as ckpt
from powergrad.training import engine, step
from powergrad.training.rundir import LOCK_NAME, RunDirError, RunLock

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist"


def recipe(out: Path, *extra: str, name: str = "resnet_pgt.yaml"):
    """The finished run's recipe (tests/helpers_runs.py): 2 epochs of 8 steps, written under
    out/resnet_pgt."""
    return load_recipe(RECIPES / name, FINISHED_SETTINGS + [f"log.output={out}", *extra])


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def finished(finished_run):
    """(log.output, run folder, final.json) of a copy of the finished run (tests/conftest.py),
    the run that recipe() trains."""
    return finished_run.parent, finished_run, json.loads((finished_run / "final.json").read_text())


def test_a_changed_recipe_is_refused_naming_the_keys(finished):
    out, run_dir, _ = finished
    before = (run_dir / "recipe.yaml").read_text(), (run_dir / "final.json").read_text()
    with pytest.raises(RunDirError) as err:
        engine.train(recipe(out, "log.checkpoint_every=3", "optim.lr=0.05", "train.epochs=3"))
    message = str(err.value)
    assert "optim.lr: 0.2 -> 0.05" in message and "train.epochs: 2 -> 3" in message
    assert "log.experiment=NAME" in message
    # nothing of the refused run reached the record
    assert ((run_dir / "recipe.yaml").read_text(), (run_dir / "final.json").read_text()) == before


def test_another_recipe_with_the_same_file_name_cannot_take_the_folder(finished, tmp_path):
    out, run_dir, _ = finished
    other = tmp_path / "resnet_pgt.yaml"  # same stem, other settings
    other.write_text(f"extends: {RECIPES / 'resnet_baseline.yaml'}\n")
    with pytest.raises(RunDirError, match="pgt.enabled: True -> False"):
        engine.train(load_recipe(other, FINISHED_SETTINGS + [f"log.output={out}"]))


def files(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.iterdir()}


def test_logging_settings_may_change_on_resume(finished, capsys):
    out, run_dir, summary = finished
    before = files(run_dir)
    capsys.readouterr()
    again = engine.train(recipe(out, "log.checkpoint_every=3", "log.log_interval=5"))
    # accepted, and finished: nothing trained again, not a file written or touched
    assert f"{run_dir}: already trained for 2 epochs; nothing written" in capsys.readouterr().out
    assert files(run_dir) == before
    assert again["updates"] == summary["updates"]
    assert [r["epoch"] for r in rows(run_dir)] == ["0", "1"]


def test_a_second_process_in_the_same_folder_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        with pytest.raises(RunDirError, match=f"in use by process {os.getpid()}"):
            engine.train(recipe(tmp_path), run_dir=run_dir)
    assert not (run_dir / LOCK_NAME).exists()  # released on exit


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "resnet_pgt"
    run_dir.mkdir()
    import socket
    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no such process
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    with RunLock(run_dir) as lock:
        assert lock.held and json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale lock" in capsys.readouterr().out


def test_kill_during_training_loses_at_most_the_step_interval_and_resumes_exactly(
        finished, tmp_path, monkeypatch):
    _, straight_dir, straight = finished
    real_clip = step.clip_gradients
    updates = []

    def killed_at_update_11(*args, **kwargs):
        updates.append(1)
        if len(updates) == 11:  # like kill -9: no handler runs, nothing more is saved
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(step, "clip_gradients", killed_at_update_11)
    with pytest.raises(KeyboardInterrupt):
        engine.train(recipe(tmp_path, "log.checkpoint_every=3"))
    monkeypatch.setattr(step, "clip_gradients", real_clip)
    run_dir = tmp_path / "resnet_pgt"
    newest = ckpt.training_checkpoints(run_dir)[0]
    assert newest.name == "step-000000009.pth"  # updates 10 and 11 are all that is lost
    assert sorted(p.name for p in run_dir.glob("step-*.pth")) == ["step-000000006.pth",
                                                                  "step-000000009.pth"]
    assert not (run_dir / LOCK_NAME).exists()

    resumed = engine.train(recipe(tmp_path, "log.checkpoint_every=3"))
    assert resumed["updates"] == straight["updates"] == 16
    a, b = ckpt.load(straight_dir / "last.pth"), ckpt.load(run_dir / "last.pth")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    columns = ("epoch", "train_loss", "train_top1", "eval_loss", "eval_top1", "lr")
    assert ([[r[c] for c in columns] for r in rows(run_dir)]
            == [[r[c] for c in columns] for r in rows(straight_dir)])


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    first = engine.train(recipe(tmp_path, "train.epochs=1", "log.checkpoint_every=3"))
    run_dir = Path(first["run_dir"])
    (run_dir / "final.json").unlink()
    last = run_dir / "last.pth"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a full disk
    os.utime(last)
    path, payload, notes = ckpt.choose_resume(run_dir, "auto")
    assert path.name == "step-000000006.pth" and payload["state"]["num_updates"] == 6
    assert len(notes) == 1 and "last.pth: cannot be read" in notes[0]
    for step_file in run_dir.glob("step-*.pth"):
        step_file.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint to resume from"):
        ckpt.choose_resume(run_dir, "auto")


def test_best_pth_is_weights_only_and_says_so(finished, tmp_path):
    _, run_dir, _ = finished
    best = ckpt.load(run_dir / "best.pth")
    assert best["format"] == ckpt.WEIGHTS_FORMAT and "optimizer" not in best
    with pytest.raises(ckpt.CheckpointError, match="holds weights only"):
        engine.train(recipe(tmp_path, f"log.resume={run_dir / 'best.pth'}"))
    (tmp_path / "foreign.pth").write_bytes(b"\x00" * 64)
    with pytest.raises(ckpt.CheckpointError, match="foreign.pth: cannot be read"):
        engine.train(recipe(tmp_path / "x", f"log.resume={tmp_path / 'foreign.pth'}"))


def test_a_diverged_epoch_is_never_saved(tmp_path, monkeypatch):
    real_step = torch.optim.SGD.step
    updates = []

    def poisoned_step(self, *args, **kwargs):  # the weights blow up on the epoch's last step
        out = real_step(self, *args, **kwargs)
        updates.append(1)
        if len(updates) == 8:
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", poisoned_step)
    with pytest.raises(step.NonFiniteError) as err:
        engine.train(recipe(tmp_path, "train.epochs=1", "log.checkpoint_every=3"))
    message = str(err.value)
    run_dir = tmp_path / "resnet_pgt"
    assert "evaluation after epoch 1/1 gave test loss nan" in message
    assert f"last good checkpoint: {run_dir / 'step-000000006.pth'}" in message
    assert not (run_dir / "last.pth").exists() and not (run_dir / "best.pth").exists()
    assert not (run_dir / "final.json").exists()
    events = read_scalars(run_dir)
    assert events["numerics/non_finite_stop"][-1] == (8, 1.0)


def test_the_run_folders_own_newest_checkpoint_wins_over_log_resume(finished, tmp_path):
    _, source_dir, _ = finished
    start = source_dir / "last.pth"
    run_dir = tmp_path / "run"
    assert ckpt.choose_resume(run_dir, str(start))[0] == start  # first launch: PATH
    run_dir.mkdir()
    (run_dir / "last.pth").write_bytes(start.read_bytes())  # the run saved its own since
    path, payload, _ = ckpt.choose_resume(run_dir, str(start))
    assert path == run_dir / "last.pth" and payload["format"] == ckpt.TRAINING_FORMAT
    assert ckpt.choose_resume(run_dir, "none")[0] is None
