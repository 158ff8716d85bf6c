"""The `powergrad` command: bad input stops before any work with a clear message and exit 2."""
import signal
import subprocess
import sys
import time
from pathlib import Path


def run(*args):
    return subprocess.run([sys.executable, "-m", "powergrad", *args], capture_output=True,
                          text=True, timeout=120)


def test_train_rejects_a_bad_recipe_before_training(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("train: {epochs: 1}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: good.yaml\noptim: {lrr: 0.1}\n")
    done = run("train", str(good), str(bad), f"log.output={tmp_path}/runs")
    assert done.returncode == 2
    assert f"{bad}: optim.lrr: unknown key" in done.stderr and "did you mean 'optim.lr'" in done.stderr
    assert not (tmp_path / "runs").exists()  # the good recipe did not start either


def test_compare_on_a_folder_without_events(tmp_path):
    done = run("compare", str(tmp_path))
    assert done.returncode == 2 and "no TensorBoard event files" in done.stderr


def test_check_passes():
    done = run("check")
    assert done.returncode == 0 and "OK" in done.stdout


def test_sigterm_exits_75_and_the_same_command_finishes(tmp_path):
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist" / "resnet_pgt.yaml"
    args = [sys.executable, "-m", "powergrad", "train", str(recipe), "train.epochs=2",
            "data.train_subset=8192", "data.eval_subset=200", "train.batch_size=64",
            "model.kwargs.channels=[8, 16, 32, 64]", f"log.output={tmp_path}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while "epoch 1/2 50/128" not in proc.stdout.readline():  # a plain progress line
        assert time.time() < deadline and proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert "preempted: saved" in out
    done = run(*args[3:])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout and "epoch 2/2:" in done.stdout
