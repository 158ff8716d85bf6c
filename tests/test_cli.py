"""The `powergrad` command: bad input stops before any work with a clear message and exit 2."""
import subprocess
import sys


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
