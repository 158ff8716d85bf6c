"""Every expected failure is one line naming the file, key or value, found before work where it
can be, and nothing is half-written: damaged data, places the user names, GPU recipes on a
CPU, and the tools."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_images import CLASSES, textured_folder
from helpers_runs import finished_args

from powergrad.commands.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
RESNET18 = REPO / "recipes/imagenet/resnet18_cosine_baseline.yaml"


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.fixture
def damaged_folder(tmp_path):
    """An ImageNet-format tree whose train/bee holds one JPEG cut in half, in the middle of
    the class, where a check of each class's first and last files does not look."""
    items = textured_folder(tmp_path / "train", per_class=8)
    textured_folder(tmp_path / "val", per_class=2, seed=1)
    bad = Path(items[8 + 4][0])
    assert bad.parent.name == "bee"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return tmp_path, bad


def small_run(root: Path, out: Path, *extra: str) -> list[str]:
    return [str(RESNET18), f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}",
            "data.loader=torchvision", "data.workers=0", "data.img_size=32",
            "data.val_img_size=32", f"model.num_classes={len(CLASSES)}",
            f"data.num_classes={len(CLASSES)}", "train.global_batch=4", "train.batch_size=4",
            "train.amp_dtype=float32", "train.eval_batch_size=6", "train.epochs=1",
            "sched.cooldown_epochs=0", "sched.warmup_epochs=0", f"log.output={out}", *extra]


def test_check_data_names_the_truncated_jpeg_among_many(damaged_folder, capsys):
    root, bad = damaged_folder
    (root / "train" / "cat" / "README.txt").write_text("not an image")
    assert cli_main(["check-data", str(root / "train"), "--workers", "2"]) == 2
    out = capsys.readouterr().out
    bad_lines = [line for line in out.splitlines() if line.startswith("bad: ")]
    assert sorted(bad_lines) == sorted([
        f"bad: {bad}: JPEG is truncated (no end-of-image marker)",
        f"bad: {root / 'train' / 'cat' / 'README.txt'}: not an image file (extensions "
        "allowed: .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp); move it out of "
        "the class folder"])
    assert "24 images in 3 classes checked" in out  # every image opened, the stray file not
    assert cli_main(["check-data", str(root / "val")]) == 0


def test_a_truncated_jpeg_mid_class_stops_training_with_one_line(damaged_folder, tmp_path,
                                                                 capsys):
    root, bad = damaged_folder
    assert cli_main(["train", *small_run(root, tmp_path / "runs")]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"data error: {bad}: unreadable image (RuntimeError: ")
    assert "powergrad check-data" in err and "data.bad_images=skip" in err
    assert not list((tmp_path / "runs").rglob("*.pth"))  # nothing of the epoch saved


def test_bad_images_skip_trains_past_it_and_counts_it(damaged_folder, tmp_path, capsys):
    root, bad = damaged_folder
    assert cli_main(["train", *small_run(root, tmp_path / "runs", "data.bad_images=skip")]) == 0
    out = capsys.readouterr().out
    assert "| 1 unreadable image(s) skipped" in out
    run = tmp_path / "runs" / RESNET18.stem
    final = json.loads((run / "final.json").read_text())
    assert final["bad_images_skipped"] == 1 and final["updates"] == 6
    from powergrad.report.events import read_scalars
    assert [v for _, v in read_scalars(run)["data/bad_images"]] == [1.0]


def test_preflight_refuses_a_stray_file_and_an_empty_class_before_any_work(tmp_path, capsys):
    textured_folder(tmp_path / "train", per_class=4)
    textured_folder(tmp_path / "val", per_class=1, seed=1)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("x")
    (tmp_path / "val" / "dog").mkdir()
    args = ["train", *small_run(tmp_path, tmp_path / "runs")]
    assert cli_main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert f"data.train_dir: got '{tmp_path / 'train'}': {tmp_path / 'train/ant/notes.txt'}: " \
           "not an image file" in err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "train" / "ant" / "notes.txt").unlink()
    assert cli_main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert f"data.val_dir: got '{tmp_path / 'val'}': {tmp_path / 'val/dog'}: class folder " \
           "is empty" in err


# --- model against data --------------------------------------------------------------------

def test_a_vit_is_refused_an_image_size_it_cannot_take(tmp_path, capsys):
    textured_folder(tmp_path / "train", per_class=4)
    textured_folder(tmp_path / "val", per_class=1, seed=1)
    deit = REPO / "recipes/imagenet/deit_small_base.yaml"
    args = ["train", str(deit), *small_run(tmp_path, tmp_path / "runs")[1:], "data.img_size=64"]
    assert cli_main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("recipe error: command line (data.val_img_size=32): "
                          "data.val_img_size: got 32: deit_small_patch16_224 cannot take 32 x "
                          "32 images (AssertionError: ") and "expected 224" in err
    assert not (tmp_path / "runs").exists()


def test_an_absurd_image_size_is_refused_before_anything_is_allocated(tmp_path, capsys):
    textured_folder(tmp_path / "train", per_class=4)
    textured_folder(tmp_path / "val", per_class=1, seed=1)
    args = ["train", *small_run(tmp_path, tmp_path / "runs"), "data.img_size=200000"]
    assert cli_main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert "data.img_size: got 200000: about " in err and "GiB" in err
    assert "expected a smaller image size" in err


# --- a GPU recipe on a CPU -------------------------------------------------------------------

def test_a_gpu_recipe_on_a_cpu_says_what_it_changed_and_records_it(tmp_path, capsys):
    """The ImageNet recipe as shipped: fp16, 12 workers, loader auto with .beton files that are
    not there, lr 0.4 for 1024 images, 90 + 10 epochs."""
    textured_folder(tmp_path / "train", per_class=4)
    textured_folder(tmp_path / "val", per_class=1, seed=1)
    args = [str(RESNET18), f"data.train_dir={tmp_path / 'train'}",
            f"data.val_dir={tmp_path / 'val'}", "data.img_size=32", "data.val_img_size=32",
            "model.num_classes=3", "data.num_classes=3", "train.global_batch=4",
            "train.eval_batch_size=6", "data.train_subset=4", f"log.output={tmp_path / 'runs'}"]
    assert cli_main(["train", *args, "--fast-dev-run", "1"]) == 0
    out = capsys.readouterr().out
    assert "note: train.amp_dtype float16 is for GPUs (fp16 autocast is very slow on a CPU): " \
           "using bfloat16 autocast on this CPU" in out
    assert "note: data.workers 12 is more than the" in out
    assert "note: data.loader auto: using torchvision on " \
           f"{tmp_path / 'train'} because /data/ffcv/train_500_0.50_90.beton does not exist" in out
    assert "note: train.global_batch 4 from the command line, but optim.lr stays 0.4, set for " \
           "1024 images per step; scaled linearly it would be optim.lr=0.001563" in out
    assert "100 epochs (train.epochs 90 + 10 cool-down)" in out
    assert "data: torchvision loader, " in out and "autocast bfloat16" in out
    assert not (tmp_path / "runs").exists()

    assert cli_main(["train", *args, "train.epochs=1", "sched.cooldown_epochs=0"]) == 0
    run = tmp_path / "runs" / RESNET18.stem
    ran_with = json.loads((run / "final.json").read_text())["ran_with"]
    assert (ran_with["loader"], ran_with["amp_dtype"]) == ("torchvision", "bfloat16")
    assert "# ran with loader: torchvision\n" in (run / "recipe.yaml").read_text()


# --- promises kept ---------------------------------------------------------------------------

def test_a_run_folder_continues_its_run_and_a_finished_one_writes_nothing(
        finished_run, tmp_path, monkeypatch, capsys):
    run = finished_run
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    monkeypatch.chdir(tmp_path)  # another folder: the run folder is still the run's
    for item in (str(run), str(run / "recipe.yaml")):
        assert cli_main(["train", item]) == 0
        assert f"{run}: already trained for 2 epochs; nothing written" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert not (tmp_path / "runs").exists()
    assert cli_main(["train", str(tmp_path)]) == 2  # a folder that is not a run's
    assert capsys.readouterr().err.startswith(
        f"powergrad train: {tmp_path}: a folder without a recipe.yaml, so not a run folder\n")


def test_one_images_per_second_in_the_epoch_line_final_json_and_compare(finished_run):
    """An epoch's images/s is its images over its seconds; the run's, all its images over all
    its training seconds (2 epochs here)."""
    run = finished_run
    from powergrad.report.compare import summarize
    final = json.loads((run / "final.json").read_text())
    import csv
    with open(run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["train_images"]) for row in rows] == [256, 256]  # data.train_subset
    for row in rows:
        by_definition = float(row["train_images"]) / float(row["epoch_seconds"])
        assert float(row["img_per_sec"]) == pytest.approx(by_definition, rel=1e-12)
    by_definition = (sum(float(row["train_images"]) for row in rows)
                     / sum(float(row["epoch_seconds"]) for row in rows))
    assert final["img_per_sec"] == pytest.approx(by_definition, rel=1e-12)
    assert summarize(run)["img_per_sec"] == final["img_per_sec"]


def test_fast_dev_run_says_what_it_ran(tmp_path, capsys):
    args = [str(REPO / "recipes/fashion_mnist/resnet_pgt.yaml"), "data.train_subset=40",
            "data.eval_subset=50", "train.batch_size=20", f"log.output={tmp_path}"]
    assert cli_main(["train", *args, "--fast-dev-run", "5"]) == 0
    out = capsys.readouterr().out
    assert "fast dev run OK: 2 step(s)" in out and "test top-1 on 1 batch(es)" in out
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", *args, "--fast-dev-run", "-1"])
    assert exit_.value.code == 2
    assert "--fast-dev-run: expected a whole number >= 0, got -1" in capsys.readouterr().err


def test_describe_writes_the_plot_where_it_says(tmp_path, capsys):
    target = tmp_path / "plots" / "schedule"  # no .png: still exactly this file
    assert cli_main(["describe", str(RESNET18), "--png", str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- places the user names -------------------------------------------------------------------

def test_an_output_path_that_is_a_file_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    args = [str(REPO / "recipes/fashion_mnist/resnet_pgt.yaml"),
            f"log.output={tmp_path / 'taken' / 'runs'}"]
    assert cli_main(["train", *args]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"log.output: got '{tmp_path / 'taken' / 'runs'}': {tmp_path / 'taken'} is a file" in err


def test_paths_expand_home_and_variables_and_an_unset_one_is_named(tmp_path, monkeypatch,
                                                                   capsys):
    from powergrad.config.loading import RecipeError, load_recipe
    monkeypatch.setenv("SCRATCH", str(tmp_path))
    recipe = load_recipe(REPO / "recipes/fashion_mnist/resnet_pgt.yaml",
                         ["log.output=$SCRATCH/runs", "data.root=~/fm"])
    assert recipe.log.output == f"{tmp_path}/runs"
    assert recipe.data.root == str(Path.home() / "fm")
    with pytest.raises(RecipeError, match="log.output: got '\\$NOPE_UNSET/runs': the "
                                          "environment variable NOPE_UNSET is not set"):
        load_recipe(REPO / "recipes/fashion_mnist/resnet_pgt.yaml", ["log.output=$NOPE_UNSET/runs"])


def test_a_full_disk_while_saving_is_one_line_and_the_last_checkpoint_survives(
        tmp_path, monkeypatch, capsys):
    """The second epoch's last.pth meets a full disk: one line, exit 2, no temporary file
    left, and the first epoch's last.pth is still there to resume from."""
    import errno

    import torch

    from powergrad.training import checkpoint as ckpt
    real_save, saves = torch.save, []

    def full_disk_on_the_second_last_pth(state, f):
        saves.append(1)
        if len(saves) == 3:  # epoch 1: last.pth, best.pth; epoch 2: last.pth
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, f)
    monkeypatch.setattr(torch, "save", full_disk_on_the_second_last_pth)
    run = tmp_path / "runs" / "resnet_pgt"
    assert cli_main(["train", *finished_args(tmp_path / "runs")]) == 2  # 2 epochs
    err = one_line(capsys.readouterr().err)
    assert err == (f"run error: {run / 'last.pth'}: could not write the checkpoint (No space "
                   "left on device); the previous one is untouched. Free space there (or "
                   "choose another log.output) and run the same command to resume")
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert ckpt.read_training(run / "last.pth")["state"]["epoch"] == 1


def test_a_bug_says_it_is_one_on_its_last_line(monkeypatch, capsys):
    from powergrad.commands import describe
    monkeypatch.setattr(describe, "describe", lambda *a, **k: 1 / 0)
    assert cli_main(["describe", str(RESNET18)]) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1].startswith(
        "powergrad describe: this is a bug in powergrad ")


# --- the tools, compare and export -----------------------------------------------------------

def run_tool(name: str, argv: list[str]) -> int:
    import runpy
    return runpy.run_path(str(REPO / "tools" / f"{name}.py"))["main"](argv)


@pytest.mark.parametrize("name,argv,named", [
    ("write_ffcv", ["imagefolder", "src", "x.beton", "--jpeg-quality", "101"], "--jpeg-quality"),
    ("write_ffcv", ["imagefolder", "src", "x.beton", "--compress-probability", "1.5"],
     "--compress-probability"),
    ("write_ffcv", ["imagefolder", "src", "x.beton", "--max-resolution", "-4"], "--max-resolution"),
    ("write_ffcv", ["imagefolder", "src", "x.beton", "--workers", "0"], "--workers"),
    ("write_ffcv", ["fashion_mnist", "src", "x.beton", "--limit", "0"], "--limit"),
    ("prepare_imagenet", ["out", "--train", "a.tar", "--val", "b.tar", "--val-solution", "c.csv",
                          "--expected-classes", "0"], "--expected-classes"),
])
def test_a_tool_option_out_of_range_is_refused_by_name(name, argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_tool(name, argv)
    assert exit_.value.code == 2
    assert f"argument {named}: expected" in capsys.readouterr().err


def test_a_study_option_out_of_range_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["study", "plan.yaml", "--max-minutes", "nan"])
    assert exit_.value.code == 2
    assert "argument --max-minutes: expected" in capsys.readouterr().err


def test_tools_name_files_that_are_not_what_they_should_be(tmp_path, capsys):
    (tmp_path / "not_a.tar").write_text("text")
    with pytest.raises(SystemExit):
        run_tool("prepare_imagenet", [str(tmp_path / "out"), "--train", str(tmp_path / "no.tar"),
                                      "--val", str(tmp_path / "not_a.tar"), "--val-solution",
                                      str(tmp_path / "not_a.tar"), "--no-md5"])
    assert f"argument --train: {tmp_path / 'no.tar'} is not a file" in capsys.readouterr().err
    assert run_tool("write_ffcv", ["imagefolder", str(tmp_path), str(tmp_path / "out.txt")]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"write_ffcv: {tmp_path / 'out.txt'}: expected an output file name ending in .beton")
    plan = tmp_path / "plan.yaml"
    plan.write_text("claims: [unclosed\n")
    assert cli_main(["study", str(plan), "--status"]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"powergrad study: {plan}: ") and "Traceback" not in err


def test_compare_and_export_name_damaged_files(finished_run, tmp_path, capsys):
    import shutil

    import torch
    run = finished_run
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "recipe.yaml").write_text("model: [unclosed\n")
    (damaged / "final.json").write_text('{"final": ')
    assert cli_main(["compare", str(damaged)]) == 0
    assert "recipe.yaml is damaged (no paper numbers)" in capsys.readouterr().out
    assert cli_main(["export", str(damaged)]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        f"export: {damaged / 'recipe.yaml'}: not valid YAML: line 2, column 1: ")

    released = tmp_path / "released"  # best.pth as other trainers release weights
    shutil.copytree(run, released)
    weights = torch.load(run / "best.pth", weights_only=True)["model"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3},
               released / "best.pth")
    assert cli_main(["export", str(released), "--out", str(tmp_path / "e1")]) == 0
    from safetensors.torch import load_file
    exported = load_file(str(tmp_path / "e1" / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in weights.items())
    torch.save({"model": {"fc.weight": torch.zeros(3, 3)}}, released / "best.pth")
    assert cli_main(["export", str(released), "--out", str(tmp_path / "e2")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "its weights do not fit the recipe's resnet18: " in err and "missing" in err
    assert "fc.weight (3, 3) vs (10, 128)" in err
    assert not (tmp_path / "e2").exists()


def test_a_damaged_study_record_is_named_not_reported(tmp_path, capsys):
    record = tmp_path / "records" / "bn_base" / "s0"
    record.mkdir(parents=True)
    (record / "final.json").write_text('{"final_test_top1": 91.')  # a copy cut short
    argv = ["study", str(REPO / "recipes" / "study" / "plan.yaml"), "--report-only", "--records",
            str(tmp_path / "records"), "--out", str(tmp_path / "report")]
    assert cli_main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"powergrad study: {record / 'final.json'}: damaged record "
                          "(JSONDecodeError: ")
    assert f"delete its folder {record} to train that run again" in err
    assert not (tmp_path / "report.md").exists()


def test_check_data_decode_finds_damage_inside_the_coded_data(tmp_path, capsys):
    """A damaged Huffman table: the header, size and end marker are fine, so only decoding
    every pixel (--decode) finds it."""
    items = textured_folder(tmp_path / "train", per_class=3)
    path = Path(items[4][0])
    data = bytearray(path.read_bytes())
    table = data.find(b"\xff\xc4") + 5  # past the DHT marker, its length and its class byte
    data[table:table + 16] = b"\xff" * 16  # code counts no Huffman table can have
    path.write_bytes(bytes(data))
    assert cli_main(["check-data", str(tmp_path / "train"), "--workers", "0"]) == 0
    capsys.readouterr()
    assert cli_main(["check-data", str(tmp_path / "train"), "--workers", "0", "--decode"]) == 2
    assert f"bad: {path}: OSError: broken data stream" in capsys.readouterr().out
